//! Activation policies: when a routine runs, and which queued items it gets.
//!
//! A policy looks at a routine's slot queues (under the routine's queue lock) and either
//! releases items — a [`Batch`] of `slot → items` plus a message — or says "not yet", possibly
//! with a time at which to look again (`time_interval`). Items are always taken from the front
//! of each queue, so a routine sees each slot's items in arrival order.
//!
//! | policy | fires when | takes |
//! | --- | --- | --- |
//! | `immediate` | any slot holds an item | everything queued, from every slot |
//! | `batch_size(n)` | every slot holds ≥ n | exactly n from each slot |
//! | `all_slots_ready` | every slot holds ≥ 1 | one from each slot |
//! | `time_interval(d)` | items are queued and the last activation was ≥ d ago (a timer wakes the routine when d ends, so trailing items are not stranded) | everything queued |
//! | `custom` | the closure returns a [`Take`] | what the take names |
//!
//! Invariant: a policy never releases an empty batch (a custom take of nothing is "not yet"),
//! so a routine cannot spin on no input.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::item::Item;

/// An activation policy: when a routine runs, and which of its queued items it gets.
///
/// | policy | fires when | takes |
/// | --- | --- | --- |
/// | `immediate` | any slot holds an item | everything queued, from every slot |
/// | `batch_size(n)` | every slot holds ≥ n | exactly n from each slot |
/// | `all_slots_ready` | every slot holds ≥ 1 | one from each slot |
/// | `time_interval(d)` | items are queued and the last activation was ≥ d ago (a timer wakes the routine when d ends, so trailing items are not stranded) | everything queued |
/// | `custom` | the closure returns a [`Take`] | what the take names |
///
/// Items are always taken from the front of each slot, in arrival order.
#[derive(Clone)]
pub enum Policy {
    /// Run as soon as anything arrives; take everything queued.
    Immediate,
    /// Run when every slot holds at least n items; take exactly n from each.
    BatchSize(usize),
    /// Run when every slot holds at least one item; take one from each.
    AllSlotsReady,
    /// Run at most once per interval; trailing items are released when the interval ends.
    TimeInterval(Duration),
    /// A user decision.
    Custom(CustomPolicy),
}

impl Policy {
    /// `batch_size(n)`.
    pub fn batch_size(n: usize) -> Self {
        Policy::BatchSize(n)
    }

    /// `time_interval(d)`.
    pub fn time_interval(d: Duration) -> Self {
        Policy::TimeInterval(d)
    }

    /// A custom policy from a closure. It runs under the routine's queue lock: keep it short.
    pub fn custom<F>(name: &str, f: F) -> Self
    where
        F: Fn(&PolicyView<'_>) -> Option<Take> + Send + Sync + 'static,
    {
        Policy::Custom(CustomPolicy {
            name: name.into(),
            decide: Arc::new(f),
        })
    }

    /// The policy's name as flow files spell it.
    pub fn name(&self) -> &str {
        match self {
            Policy::Immediate => "immediate",
            Policy::BatchSize(_) => "batch_size",
            Policy::AllSlotsReady => "all_slots_ready",
            Policy::TimeInterval(_) => "time_interval",
            Policy::Custom(c) => &c.name,
        }
    }

    /// The message handed to the logic with every batch of a built-in policy.
    pub(crate) fn message(&self) -> Option<Arc<Value>> {
        let v = match self {
            Policy::Immediate => json!({"policy": "immediate"}),
            Policy::BatchSize(n) => json!({"policy": "batch_size", "n": n}),
            Policy::AllSlotsReady => json!({"policy": "all_slots_ready"}),
            Policy::TimeInterval(d) => {
                json!({"policy": "time_interval", "interval_ms": d.as_millis() as u64})
            }
            Policy::Custom(_) => return None,
        };
        Some(Arc::new(v))
    }

    /// A cheap test, made when an item arrives, of whether a check could release anything.
    /// `true` may be wrong (the check then finds nothing); `false` must be right.
    pub(crate) fn may_fire(&self, queues: &[VecDeque<Item>]) -> bool {
        match self {
            Policy::Immediate | Policy::TimeInterval(_) | Policy::Custom(_) => true,
            Policy::BatchSize(n) => queues.iter().all(|q| q.len() >= *n),
            Policy::AllSlotsReady => queues.iter().all(|q| !q.is_empty()),
        }
    }

    /// Decides what to release now.
    pub(crate) fn decide(
        &self,
        names: &[Arc<str>],
        queues: &[VecDeque<Item>],
        last_fire: Option<Instant>,
        now: Instant,
    ) -> Decision {
        let any = queues.iter().any(|q| !q.is_empty());
        match self {
            Policy::Immediate => {
                if any {
                    Decision::Fire(queues.iter().map(VecDeque::len).collect(), None)
                } else {
                    Decision::Idle
                }
            }
            Policy::BatchSize(n) => {
                if *n > 0 && queues.iter().all(|q| q.len() >= *n) {
                    Decision::Fire(vec![*n; queues.len()], None)
                } else {
                    Decision::Idle
                }
            }
            Policy::AllSlotsReady => {
                if !queues.is_empty() && queues.iter().all(|q| !q.is_empty()) {
                    Decision::Fire(vec![1; queues.len()], None)
                } else {
                    Decision::Idle
                }
            }
            Policy::TimeInterval(d) => {
                if !any {
                    return Decision::Idle;
                }
                match last_fire.map(|last| last.checked_add(*d)) {
                    // An interval too long to represent never ends.
                    Some(None) => Decision::Idle,
                    Some(Some(next)) if now < next => Decision::WaitUntil(next),
                    _ => Decision::Fire(queues.iter().map(VecDeque::len).collect(), None),
                }
            }
            Policy::Custom(c) => {
                let view = PolicyView {
                    names,
                    queues,
                    last_activation: last_fire,
                };
                // User code runs on a worker under the routine's lock: a panic must not unwind
                // through the scheduler.
                let decided =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.decide)(&view)));
                let take = match decided {
                    Ok(Some(take)) => take,
                    Ok(None) => return Decision::Idle,
                    Err(payload) => {
                        return Decision::Broken(format!(
                            "custom policy `{}` panicked: {}",
                            c.name,
                            panic_message(payload.as_ref())
                        ));
                    }
                };
                let mut counts = vec![0; queues.len()];
                for (slot, n) in take.counts {
                    match names.iter().position(|s| **s == *slot) {
                        Some(i) => counts[i] = n.min(queues[i].len()),
                        None => tracing::warn!(
                            policy = %c.name,
                            slot = %slot,
                            "custom policy named an unknown slot; ignored"
                        ),
                    }
                }
                if take.all {
                    counts = queues.iter().map(VecDeque::len).collect();
                }
                if counts.iter().all(|&n| n == 0) {
                    Decision::Idle
                } else {
                    Decision::Fire(counts, take.message.map(Arc::new))
                }
            }
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Immediate => write!(f, "immediate"),
            Policy::BatchSize(n) => write!(f, "batch_size({n})"),
            Policy::AllSlotsReady => write!(f, "all_slots_ready"),
            Policy::TimeInterval(d) => write!(f, "time_interval({d:?})"),
            Policy::Custom(c) => write!(f, "custom({})", c.name),
        }
    }
}

/// What a policy decided.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Release this many items from the front of each slot (index-aligned with the slots),
    /// with an optional message overriding the policy's default one.
    Fire(Vec<usize>, Option<Arc<Value>>),
    /// Nothing now; look again at this instant.
    WaitUntil(Instant),
    /// Nothing until more items arrive.
    Idle,
    /// The policy itself failed (a custom policy panicked): the routine cannot go on.
    Broken(String),
}

/// A user-defined policy (see [`Policy::custom`]).
#[derive(Clone)]
pub struct CustomPolicy {
    name: Arc<str>,
    #[allow(clippy::type_complexity)]
    decide: Arc<dyn Fn(&PolicyView<'_>) -> Option<Take> + Send + Sync>,
}

/// What a custom policy sees: the routine's slot queues, read-only.
pub struct PolicyView<'a> {
    names: &'a [Arc<str>],
    queues: &'a [VecDeque<Item>],
    last_activation: Option<Instant>,
}

impl PolicyView<'_> {
    /// Slot names in declaration order.
    pub fn slot_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|s| &**s)
    }

    /// Items queued in a slot (0 for an unknown slot).
    pub fn len(&self, slot: &str) -> usize {
        self.queue(slot).map_or(0, VecDeque::len)
    }

    /// Whether every slot is empty.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// The queued items of a slot, oldest first.
    pub fn items(&self, slot: &str) -> impl Iterator<Item = &Item> {
        self.queue(slot).into_iter().flat_map(|q| q.iter())
    }

    /// When this routine last activated in this job.
    pub fn last_activation(&self) -> Option<Instant> {
        self.last_activation
    }

    fn queue(&self, slot: &str) -> Option<&VecDeque<Item>> {
        let i = self.names.iter().position(|s| **s == *slot)?;
        self.queues.get(i)
    }
}

/// A custom policy's release: how many items to take from the front of which slots.
#[derive(Clone, Debug, Default)]
pub struct Take {
    counts: Vec<(String, usize)>,
    all: bool,
    message: Option<Value>,
}

impl Take {
    /// Takes nothing yet; add slots with [`Take::slot`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes everything queued in every slot.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Takes `n` items (at most what is queued) from the front of `slot`.
    pub fn slot(mut self, slot: &str, n: usize) -> Self {
        self.counts.push((slot.to_owned(), n));
        self
    }

    /// Attaches a message for the logic.
    pub fn message(mut self, message: Value) -> Self {
        self.message = Some(message);
        self
    }
}

/// The items one activation received: `slot → items` (arrival order) and the policy's message.
#[derive(Clone, Debug)]
pub struct Batch {
    names: Arc<[Arc<str>]>,
    data: Vec<Vec<Item>>,
    message: Option<Arc<Value>>,
    /// The activation's number within its routine and job (1, 2, …; 0 for a batch made by
    /// hand), kept by every retry of it.
    number: u64,
    /// In a durable job, where each item was queued: `(slot, seq)`, in the order of the items
    /// (empty otherwise). What consuming the batch removes from the job's store.
    seqs: Vec<(u32, u64)>,
}

impl Batch {
    pub(crate) fn new(
        names: Arc<[Arc<str>]>,
        data: Vec<Vec<Item>>,
        message: Option<Arc<Value>>,
    ) -> Self {
        debug_assert_eq!(names.len(), data.len());
        Self {
            names,
            data,
            message,
            number: 0,
            seqs: Vec::new(),
        }
    }

    /// The batch of a durable job, its items queued under `seqs` (see [`Batch::seqs`]).
    pub(crate) fn with_seqs(mut self, seqs: Vec<(u32, u64)>) -> Self {
        self.seqs = seqs;
        self
    }

    /// Where the items were queued in a durable job's store: `(slot, seq)` (empty in a job
    /// that is not durable).
    pub(crate) fn seqs(&self) -> &[(u32, u64)] {
        &self.seqs
    }

    /// The batch as activation `number` of its routine.
    pub(crate) fn numbered(mut self, number: u64) -> Self {
        self.number = number;
        self
    }

    /// The activation's number within its routine and job (0 for a batch made by hand).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Builds a batch by hand (for driving a [`Logic`](crate::Logic) in tests).
    pub fn from_slots<I, S>(slots: I, message: Option<Value>) -> Self
    where
        I: IntoIterator<Item = (S, Vec<Item>)>,
        S: AsRef<str>,
    {
        let (names, data): (Vec<Arc<str>>, Vec<Vec<Item>>) = slots
            .into_iter()
            .map(|(s, items)| (Arc::from(s.as_ref()), items))
            .unzip();
        Self::new(names.into(), data, message.map(Arc::new))
    }

    /// The items released from `slot` (empty for a slot that released none or does not exist).
    pub fn slot(&self, slot: &str) -> &[Item] {
        self.names
            .iter()
            .position(|s| **s == *slot)
            .map_or(&[], |i| &self.data[i])
    }

    /// Every slot with its items, in slot declaration order.
    pub fn slots(&self) -> impl Iterator<Item = (&str, &[Item])> {
        self.names
            .iter()
            .zip(&self.data)
            .map(|(n, d)| (&**n, d.as_slice()))
    }

    /// Every item of every slot.
    pub fn items(&self) -> impl Iterator<Item = &Item> {
        self.data.iter().flatten()
    }

    /// The total number of items.
    pub fn len(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Whether the batch holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The policy's message.
    pub fn message(&self) -> Option<&Value> {
        self.message.as_deref()
    }

    /// The policy's message, shared (the same `Arc` for every batch of a built-in policy).
    pub(crate) fn message_arc(&self) -> Option<&Arc<Value>> {
        self.message.as_ref()
    }

    pub(crate) fn into_parts(self) -> (Arc<[Arc<str>]>, Vec<Vec<Item>>) {
        (self.names, self.data)
    }
}

/// The text of a caught panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: usize) -> VecDeque<Item> {
        (0..n)
            .map(|i| Item::new(json!({"i": i})).unwrap())
            .collect()
    }

    fn names(n: usize) -> Vec<Arc<str>> {
        (0..n)
            .map(|i| Arc::from(format!("s{i}").as_str()))
            .collect()
    }

    #[test]
    fn builtin_policies_decide_per_their_semantics() {
        let now = Instant::now();
        let n2 = names(2);
        let d = |p: &Policy, qs: &[VecDeque<Item>]| p.decide(&n2, qs, None, now);
        assert_eq!(d(&Policy::Immediate, &[q(0), q(0)]), Decision::Idle);
        assert_eq!(
            d(&Policy::Immediate, &[q(3), q(0)]),
            Decision::Fire(vec![3, 0], None)
        );
        assert_eq!(d(&Policy::batch_size(2), &[q(3), q(1)]), Decision::Idle);
        assert_eq!(
            d(&Policy::batch_size(2), &[q(3), q(2)]),
            Decision::Fire(vec![2, 2], None)
        );
        assert_eq!(d(&Policy::AllSlotsReady, &[q(3), q(0)]), Decision::Idle);
        assert_eq!(
            d(&Policy::AllSlotsReady, &[q(3), q(5)]),
            Decision::Fire(vec![1, 1], None)
        );
        assert!(!Policy::batch_size(2).may_fire(&[q(3), q(1)]));
        assert!(Policy::AllSlotsReady.may_fire(&[q(1), q(1)]));
    }

    #[test]
    fn time_interval_waits_until_the_interval_ends() {
        let now = Instant::now();
        let p = Policy::time_interval(Duration::from_millis(100));
        let n1 = names(1);
        assert_eq!(
            p.decide(&n1, &[q(2)], None, now),
            Decision::Fire(vec![2], None)
        );
        let last = now - Duration::from_millis(30);
        assert_eq!(
            p.decide(&n1, &[q(2)], Some(last), now),
            Decision::WaitUntil(last + Duration::from_millis(100))
        );
        assert_eq!(p.decide(&n1, &[q(0)], Some(last), now), Decision::Idle);
    }

    #[test]
    fn custom_policy_takes_what_it_names_and_never_nothing() {
        let now = Instant::now();
        let n2 = names(2);
        let p = Policy::custom("pairs", |v| {
            (v.len("s0") >= 2).then(|| Take::new().slot("s0", 2).message(json!({"k": 1})))
        });
        assert_eq!(p.decide(&n2, &[q(1), q(9)], None, now), Decision::Idle);
        assert_eq!(
            p.decide(&n2, &[q(4), q(9)], None, now),
            Decision::Fire(vec![2, 0], Some(Arc::new(json!({"k": 1}))))
        );
        let nothing = Policy::custom("nothing", |_| Some(Take::new().slot("s1", 5)));
        assert_eq!(
            nothing.decide(&n2, &[q(4), q(0)], None, now),
            Decision::Idle
        );
    }
}
