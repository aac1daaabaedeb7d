//! Flows: routines by id and the connections between them, validated as a whole.
//!
//! A [`Flow`] is built freely (`add_routine`, `connect` never fail) and then checked by
//! [`Flow::validate`], which reports every problem at once: unknown routines, events and slots
//! (with the nearest valid name), duplicate ids and connections, policies that can never fire,
//! missing logic, and cycles (unless the flow allows them). A slot left unconnected on a
//! routine whose other slots are connected is a warning (only a post could fill it); a routine
//! with no connected slot at all is an entry point and needs no warning.
//!
//! A valid flow compiles into a [`Compiled`] flow: its plan (routines in a vector, names
//! resolved to indices, a routing table) and the logic of each routine beside it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;

use super::activation::Policy;
use super::budget::Budgets;
use super::plan::{CompiledFlow, CompiledRoutine};
use super::routine::{Logic, Routine};
use super::spec::ErrorStrategy;

/// A connection from one routine's event to another routine's slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Source routine id.
    pub from: String,
    /// Source event.
    pub event: String,
    /// Destination routine id.
    pub to: String,
    /// Destination slot.
    pub slot: String,
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} -> {}.{}",
            self.from, self.event, self.to, self.slot
        )
    }
}

/// A graph of routines by id and connections between them. Built freely (`add_routine` and
/// `connect` never fail), then checked as a whole by [`Flow::validate`], which reports every
/// problem at once.
#[derive(Clone, Debug)]
pub struct Flow {
    routines: IndexMap<String, Routine>,
    duplicate_ids: Vec<String>,
    connections: Vec<Connection>,
    on_error: ErrorStrategy,
    allow_cycles: bool,
    budgets: Budgets,
}

impl Default for Flow {
    fn default() -> Self {
        Self::new()
    }
}

/// One thing wrong with a flow.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    /// Two routines were added under one id.
    #[error("routine id `{id}` is used more than once")]
    DuplicateRoutine {
        /// The id.
        id: String,
    },
    /// A routine has no logic.
    #[error("routine `{routine}` has no logic")]
    NoLogic {
        /// The routine.
        routine: String,
    },
    /// A routine has no slots, so nothing can ever activate it.
    #[error("routine `{routine}` has no slots, so it can never activate")]
    NoSlots {
        /// The routine.
        routine: String,
    },
    /// Two slots or two events of one routine share a name.
    #[error("routine `{routine}` declares {what} `{name}` more than once")]
    DuplicateName {
        /// The routine.
        routine: String,
        /// `slot` or `event`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A slot that can hold nothing.
    #[error(
        "routine `{routine}`: slot `{slot}` has a bound of 0 (items or bytes) and could never \
         hold an item"
    )]
    ZeroCapacity {
        /// The routine.
        routine: String,
        /// The slot.
        slot: String,
    },
    /// Concurrency 0.
    #[error("routine `{routine}` has concurrency 0; it must be at least 1")]
    ZeroConcurrency {
        /// The routine.
        routine: String,
    },
    /// The activation policy can never release a batch.
    #[error("routine `{routine}`: policy {policy} can never fire: {reason}")]
    PolicyNeverFires {
        /// The routine.
        routine: String,
        /// The policy, as written.
        policy: String,
        /// Why.
        reason: String,
    },
    /// A retry strategy with impossible parameters.
    #[error("routine `{routine}`: retry backoff must be a finite number ≥ 0, got {backoff}")]
    BadRetry {
        /// The routine.
        routine: String,
        /// The backoff given.
        backoff: f64,
    },
    /// A connection names a routine that is not in the flow.
    #[error("connection `{connection}`: no routine `{id}`{}", hint(suggestion))]
    UnknownRoutine {
        /// The connection, as written.
        connection: String,
        /// The unknown id.
        id: String,
        /// The nearest routine id, if one is close.
        suggestion: Option<String>,
    },
    /// A connection names an event its source routine does not declare.
    #[error(
        "connection `{connection}`: routine `{routine}` has no event `{event}`{}",
        hint(suggestion)
    )]
    UnknownEvent {
        /// The connection.
        connection: String,
        /// The source routine.
        routine: String,
        /// The unknown event.
        event: String,
        /// The nearest declared event, if one is close.
        suggestion: Option<String>,
    },
    /// A connection names a slot its destination routine does not declare.
    #[error(
        "connection `{connection}`: routine `{routine}` has no slot `{slot}`{}",
        hint(suggestion)
    )]
    UnknownSlot {
        /// The connection.
        connection: String,
        /// The destination routine.
        routine: String,
        /// The unknown slot.
        slot: String,
        /// The nearest declared slot, if one is close.
        suggestion: Option<String>,
    },
    /// The same connection twice (it would deliver every item twice).
    #[error("connection `{connection}` is declared more than once")]
    DuplicateConnection {
        /// The connection.
        connection: String,
    },
    /// Routines that feed each other in a loop.
    #[error("cycle: {} (allow it with Flow::allow_cycles)", show_path(path))]
    Cycle {
        /// The routines of the cycle, the first repeated at the end.
        path: Vec<String>,
    },
    /// More cycles than are worth listing one by one.
    #[error("… and {more} more cycles")]
    MoreCycles {
        /// How many were not listed.
        more: usize,
    },
}

/// Most cycles a validation lists one by one.
pub const MAX_CYCLES_LISTED: usize = 20;

/// A cycle's path for people: long ones shortened in the middle.
fn show_path(path: &[String]) -> String {
    const ENDS: usize = 6;
    if path.len() <= 2 * ENDS + 1 {
        return path.join(" -> ");
    }
    format!(
        "{} -> … ({} more) … -> {}",
        path[..ENDS].join(" -> "),
        path.len() - 2 * ENDS,
        path[path.len() - ENDS..].join(" -> ")
    )
}

/// " (did you mean `x`?)" when there is a suggestion, else nothing.
pub(crate) fn hint(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

/// Something legal but probably unintended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Warning {
    /// No connection feeds this slot: only external posts can fill it.
    #[error(
        "routine `{routine}`: slot `{slot}` has no incoming connection (only posts can fill it)"
    )]
    UnconnectedSlot {
        /// The routine.
        routine: String,
        /// The slot.
        slot: String,
    },
}

/// Every problem found in a flow.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct FlowError {
    /// The problems, in the order found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid flow: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The nearest of `candidates` to `name`, if it is close enough to be a likely typo: within
/// two edits (and not a complete rewrite of a short name), or very similar by Jaro-Winkler.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .filter_map(|c| {
            let edits = strsim::damerau_levenshtein(name, c);
            let jw = strsim::jaro_winkler(name, c);
            let close =
                (edits <= 2 && edits < c.chars().count().max(name.chars().count())) || jw >= 0.85;
            close.then_some((edits, -((jw * 1000.0) as i64), c))
        })
        .min()
        .map(|(_, _, c)| c.to_owned())
}

impl Flow {
    /// An empty flow whose default error strategy is `stop`.
    pub fn new() -> Self {
        Self {
            routines: IndexMap::new(),
            duplicate_ids: Vec::new(),
            connections: Vec::new(),
            on_error: ErrorStrategy::Stop,
            allow_cycles: false,
            budgets: Budgets::default(),
        }
    }

    /// Adds a routine under `id`. A duplicate id is reported by [`Flow::validate`].
    pub fn add_routine(&mut self, routine: Routine, id: &str) -> &mut Self {
        if self.routines.contains_key(id) {
            self.duplicate_ids.push(id.to_owned());
        } else {
            self.routines.insert(id.to_owned(), routine);
        }
        self
    }

    /// Connects `from.event` to `to.slot`. Unknown names are reported by [`Flow::validate`].
    pub fn connect(&mut self, from: &str, event: &str, to: &str, slot: &str) -> &mut Self {
        self.connections.push(Connection {
            from: from.to_owned(),
            event: event.to_owned(),
            to: to.to_owned(),
            slot: slot.to_owned(),
        });
        self
    }

    /// The error strategy of routines that set none (default `stop`).
    pub fn on_error(&mut self, strategy: ErrorStrategy) -> &mut Self {
        self.on_error = strategy;
        self
    }

    /// Sets the byte budgets of each job of this flow (see [`Budgets`]).
    pub fn budgets(&mut self, budgets: Budgets) -> &mut Self {
        self.budgets = budgets;
        self
    }

    /// Accepts cycles (feedback loops) instead of reporting them.
    pub fn allow_cycles(&mut self, allow: bool) -> &mut Self {
        self.allow_cycles = allow;
        self
    }

    /// The routines by id, in insertion order.
    pub fn routines(&self) -> impl Iterator<Item = (&str, &Routine)> {
        self.routines.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The connections, in insertion order.
    pub fn connections(&self) -> &[Connection] {
        &self.connections
    }

    /// Checks the whole flow; returns its warnings, or every problem at once.
    pub fn validate(&self) -> Result<Vec<Warning>, FlowError> {
        let mut problems = Vec::new();
        for id in &self.duplicate_ids {
            problems.push(Problem::DuplicateRoutine { id: id.clone() });
        }
        for (id, r) in &self.routines {
            check_routine(id, r, &self.on_error, &mut problems);
        }

        let mut seen = HashSet::new();
        let mut fed: HashSet<(&str, &str)> = HashSet::new();
        let mut edges: Vec<(usize, usize)> = Vec::new();
        for c in &self.connections {
            let connection = c.to_string();
            if !seen.insert(c) {
                problems.push(Problem::DuplicateConnection {
                    connection: connection.clone(),
                });
            }
            let src = self.find_routine(&c.from, &connection, &mut problems);
            let dst = self.find_routine(&c.to, &connection, &mut problems);
            let event_ok = src.is_some_and(|(_, s)| s.events.iter().any(|e| *e.name == *c.event));
            if let Some((_, s)) = src
                && !event_ok
            {
                problems.push(Problem::UnknownEvent {
                    connection: connection.clone(),
                    routine: c.from.clone(),
                    event: c.event.clone(),
                    suggestion: suggest(&c.event, s.events.iter().map(|e| &*e.name)),
                });
            }
            let slot_ok = dst.is_some_and(|(_, d)| d.slots.iter().any(|s| *s.name == *c.slot));
            if let Some((_, d)) = dst {
                if slot_ok {
                    fed.insert((&c.to, &c.slot));
                } else {
                    problems.push(Problem::UnknownSlot {
                        connection: connection.clone(),
                        routine: c.to.clone(),
                        slot: c.slot.clone(),
                        suggestion: suggest(&c.slot, d.slots.iter().map(|s| &*s.name)),
                    });
                }
            }
            if let (Some((si, _)), Some((di, _)), true, true) = (src, dst, event_ok, slot_ok) {
                edges.push((si, di));
            }
        }

        if !self.allow_cycles {
            let ids: Vec<&str> = self.routines.keys().map(String::as_str).collect();
            let cycles = find_cycles(ids.len(), &edges);
            let more = cycles.len().saturating_sub(MAX_CYCLES_LISTED);
            for path in cycles.into_iter().take(MAX_CYCLES_LISTED) {
                problems.push(Problem::Cycle {
                    path: path.into_iter().map(|i| ids[i].to_owned()).collect(),
                });
            }
            if more > 0 {
                problems.push(Problem::MoreCycles { more });
            }
        }

        if !problems.is_empty() {
            return Err(FlowError { problems });
        }
        // A routine none of whose slots is connected is an entry point, fed by posts. A
        // routine with some slots connected and others not has probably lost a connection.
        let mut warnings = Vec::new();
        for (id, r) in &self.routines {
            if !r
                .slots
                .iter()
                .any(|s| fed.contains(&(id.as_str(), &*s.name)))
            {
                continue;
            }
            for s in &r.slots {
                if !fed.contains(&(id.as_str(), &*s.name)) {
                    warnings.push(Warning::UnconnectedSlot {
                        routine: id.clone(),
                        slot: s.name.to_string(),
                    });
                }
            }
        }
        Ok(warnings)
    }

    fn find_routine(
        &self,
        id: &str,
        connection: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<(usize, &Routine)> {
        match self.routines.get_full(id) {
            Some((i, _, r)) => Some((i, r)),
            None => {
                let problem = Problem::UnknownRoutine {
                    connection: connection.to_owned(),
                    id: id.to_owned(),
                    suggestion: suggest(id, self.routines.keys().map(String::as_str)),
                };
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
                None
            }
        }
    }

    /// Validates and compiles into the form the runtime executes.
    pub(crate) fn compile(&self) -> Result<(Compiled, Vec<Warning>), FlowError> {
        let warnings = self.validate()?;
        let index: HashMap<String, usize> = self
            .routines
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let mut logic: Vec<Arc<dyn Logic>> = Vec::with_capacity(self.routines.len());
        let mut routines: Vec<CompiledRoutine> = self
            .routines
            .iter()
            .filter_map(|(id, r)| {
                logic.push(r.logic.clone()?);
                Some(CompiledRoutine {
                    id: id.as_str().into(),
                    slot_names: r.slots.iter().map(|s| s.name.clone()).collect(),
                    capacities: r.slots.iter().map(|s| s.max_queue_length).collect(),
                    queue_bytes: r.slots.iter().map(|s| s.max_queue_bytes).collect(),
                    budgets: r.budgets,
                    routes: vec![Vec::new(); r.events.len()],
                    events: r.events.clone(),
                    config: r.config.clone(),
                    message: r.policy.message(),
                    policy: r.policy.clone(),
                    on_error: r.on_error.clone().unwrap_or_else(|| self.on_error.clone()),
                    concurrency: r.concurrency,
                })
            })
            .collect();
        for c in &self.connections {
            let (Some(&s), Some(&d)) = (index.get(&c.from), index.get(&c.to)) else {
                continue;
            };
            let ev = routines[s].event_index(&c.event);
            let slot = routines[d].slot_index(&c.slot);
            if let (Some(ev), Some(slot)) = (ev, slot) {
                routines[s].routes[ev].push((d, slot));
            }
        }
        let edges: Vec<(usize, usize)> = routines
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.routes.iter().flatten().map(move |&(d, _)| (i, d)))
            .collect();
        let cyclic = !find_cycles(routines.len(), &edges).is_empty();
        Ok((
            Compiled {
                plan: Arc::new(CompiledFlow {
                    routines,
                    index,
                    cyclic,
                    budgets: self.budgets.clone(),
                }),
                logic: logic.into(),
            },
            warnings,
        ))
    }
}

/// A validated flow, ready to run: its plan, and the logic of each of its routines (by the
/// plan's routine index).
pub(crate) struct Compiled {
    pub(crate) plan: Arc<CompiledFlow>,
    pub(crate) logic: Arc<[Arc<dyn Logic>]>,
}

fn check_routine(id: &str, r: &Routine, default: &ErrorStrategy, problems: &mut Vec<Problem>) {
    let routine = || id.to_owned();
    if r.logic.is_none() {
        problems.push(Problem::NoLogic { routine: routine() });
    }
    if r.slots.is_empty() {
        problems.push(Problem::NoSlots { routine: routine() });
    }
    if r.concurrency == 0 {
        problems.push(Problem::ZeroConcurrency { routine: routine() });
    }
    let mut names = HashSet::new();
    for s in &r.slots {
        if !names.insert(&s.name) {
            problems.push(Problem::DuplicateName {
                routine: routine(),
                what: "slot",
                name: s.name.to_string(),
            });
        }
        if s.max_queue_length == 0 || s.max_queue_bytes == 0 {
            problems.push(Problem::ZeroCapacity {
                routine: routine(),
                slot: s.name.to_string(),
            });
        }
    }
    let mut names = HashSet::new();
    for e in &r.events {
        if !names.insert(&e.name) {
            problems.push(Problem::DuplicateName {
                routine: routine(),
                what: "event",
                name: e.name.to_string(),
            });
        }
    }
    let never = |reason: String| Problem::PolicyNeverFires {
        routine: routine(),
        policy: format!("{:?}", r.policy),
        reason,
    };
    match &r.policy {
        Policy::BatchSize(0) => problems.push(never("a batch of 0 items is no batch".into())),
        Policy::BatchSize(n) => {
            for s in r.slots.iter().filter(|s| s.max_queue_length < *n) {
                problems.push(never(format!(
                    "slot `{}` holds at most {} items (max_queue_length), fewer than the batch",
                    s.name, s.max_queue_length
                )));
            }
        }
        _ => {}
    }
    if let ErrorStrategy::Retry(p) = r.on_error.as_ref().unwrap_or(default)
        && !(p.backoff.is_finite() && p.backoff >= 0.0)
    {
        problems.push(Problem::BadRetry {
            routine: routine(),
            backoff: p.backoff,
        });
    }
}

/// Every elementary cycle reachable by a depth-first search, one per back edge (enough to show
/// the user each loop; not an enumeration of all cycles).
fn find_cycles(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut adj = vec![Vec::new(); n];
    for &(a, b) in edges {
        if !adj[a].contains(&b) {
            adj[a].push(b);
        }
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Color {
        White,
        Grey,
        Black,
    }
    let mut color = vec![Color::White; n];
    let mut cycles = Vec::new();
    for root in 0..n {
        if color[root] != Color::White {
            continue;
        }
        // Iterative DFS: (node, next child index); the stack is the current path.
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        color[root] = Color::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&child) = adj[node].get(*next) {
                *next += 1;
                match color[child] {
                    Color::White => {
                        color[child] = Color::Grey;
                        stack.push((child, 0));
                    }
                    Color::Grey => {
                        let start = stack.iter().position(|&(v, _)| v == child).unwrap_or(0);
                        let mut path: Vec<usize> = stack[start..].iter().map(|&(v, _)| v).collect();
                        path.push(child);
                        cycles.push(path);
                    }
                    Color::Black => {}
                }
            } else {
                color[node] = Color::Black;
                stack.pop();
            }
        }
    }
    cycles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Routine {
        Routine::new()
            .slot("in")
            .event("out", ["x"])
            .logic(|_, _| Ok(()))
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut f = Flow::new();
        f.add_routine(r(), "a")
            .add_routine(r(), "b")
            .add_routine(r(), "a")
            .add_routine(Routine::new().policy(Policy::batch_size(0)), "c")
            .connect("a", "out", "b", "in")
            .connect("a", "out", "b", "in")
            .connect("a", "ot", "bb", "inn")
            .connect("b", "out", "b", "inp");
        let err = f.validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("routine id `a` is used more than once"),
            "{text}"
        );
        assert!(text.contains("routine `c` has no logic"), "{text}");
        assert!(text.contains("routine `c` has no slots"), "{text}");
        assert!(text.contains("can never fire"), "{text}");
        assert!(
            text.contains("`a.out -> b.in` is declared more than once"),
            "{text}"
        );
        assert!(
            text.contains("no routine `bb` (did you mean `b`?)"),
            "{text}"
        );
        assert!(
            text.contains("has no event `ot` (did you mean `out`?)"),
            "{text}"
        );
        assert!(
            text.contains("has no slot `inp` (did you mean `in`?)"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 8, "{text}");
    }

    #[test]
    fn cycles_are_errors_unless_allowed() {
        let mut f = Flow::new();
        f.add_routine(r(), "a")
            .add_routine(r(), "b")
            .add_routine(r(), "c")
            .connect("a", "out", "b", "in")
            .connect("b", "out", "c", "in")
            .connect("c", "out", "a", "in");
        let err = f.validate().unwrap_err();
        assert_eq!(
            err.problems,
            vec![Problem::Cycle {
                path: vec!["a".into(), "b".into(), "c".into(), "a".into()]
            }]
        );
        f.allow_cycles(true);
        assert_eq!(f.validate().unwrap(), vec![]);
    }

    #[test]
    fn batch_larger_than_queue_never_fires_and_entry_slots_warn() {
        let mut f = Flow::new();
        f.add_routine(
            Routine::new()
                .slot_with_capacity("in", 5)
                .policy(Policy::batch_size(10))
                .logic(|_, _| Ok(())),
            "big",
        );
        let err = f.validate().unwrap_err();
        assert!(matches!(err.problems[0], Problem::PolicyNeverFires { .. }));
        let mut ok = Flow::new();
        ok.add_routine(r(), "entry")
            .add_routine(r().slot("other"), "join")
            .connect("entry", "out", "join", "in");
        assert_eq!(
            ok.validate().unwrap(),
            vec![Warning::UnconnectedSlot {
                routine: "join".into(),
                slot: "other".into()
            }],
            "the entry routine's slot is not a warning; the join's forgotten slot is"
        );
    }
}
