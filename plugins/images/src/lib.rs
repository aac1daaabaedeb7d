//! The reference page's parallel image processing: a producer emits images; resize, filter
//! and compress each process every image, in parallel with each other.

use std::time::Duration;

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// Emits `count` images per trigger (`{"count": n}`).
pub struct Producer;

impl Routine for Producer {
    const NAME: &'static str = "producer";
    fn spec() -> Spec {
        Spec::new("emits `count` images per trigger")
            .slot("trigger")
            .event("image", ["name", "width", "height"])
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        for trigger in batch.slot("trigger") {
            let count: u32 = trigger.get_opt("count")?.unwrap_or(1);
            for i in 0..count {
                let name = format!("img{i}.png");
                println!("producing {name}");
                ctx.emit(
                    "image",
                    &json!({ "name": name, "width": 1920, "height": 1080 }),
                )?;
            }
        }
        Ok(())
    }
}

macro_rules! processor {
    ($ty:ident, $name:literal, $verb:literal) => {
        #[doc = concat!("Spends `work_ms` (config) on each image, then emits it as ", $verb, ".")]
        pub struct $ty;

        impl Routine for $ty {
            const NAME: &'static str = $name;
            fn spec() -> Spec {
                Spec::new(concat!($verb, " each image (simulated work of `work_ms`)"))
                    .slot("image")
                    .event("done", ["name", "step"])
                    .config("work_ms", 50)
            }
            fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
                let work: u64 = ctx.config("work_ms")?.unwrap_or(50);
                for image in batch.slot("image") {
                    let name: String = image.get("name")?;
                    println!("{} {name}: start", $name);
                    std::thread::sleep(Duration::from_millis(work));
                    println!("{} {name}: done", $name);
                    ctx.emit("done", &json!({ "name": name, "step": $name }))?;
                }
                Ok(())
            }
        }
    };
}

processor!(Resize, "resize", "resized");
processor!(Filter, "filter", "filtered");
processor!(Compress, "compress", "compressed");

routilux_sdk::export!(Producer, Resize, Filter, Compress);
