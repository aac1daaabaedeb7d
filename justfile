# Thin recipes over cargo. Each one is also spelled out in the README.

# The fan-out demo, end to end (builds the plugins, runs examples/news_fanout.yaml).
demo:
    cargo run --release -p routilux -- run examples/news_fanout.yaml --build

# The routilux CLI, e.g. `just cli validate examples/priority_routing.yaml`.
cli *ARGS:
    cargo run --release -p routilux -- {{ARGS}}

# The whole test suite (what CI runs).
test:
    scripts/guest-toolchains && cargo test --workspace

# Format check and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The engine benchmark (routilux vs bare crossbeam-channel); pass e.g. `--reps 3`.
bench *ARGS:
    cargo bench -p routilux --bench engine -- {{ARGS}}

# The four-language fan-out (Rust, Python, JavaScript and C subscribers).
polyglot:
    cargo run --release -p routilux -- run examples/polyglot_fanout.yaml --build

# Guest languages side by side (Rust, C, Python, QuickJS, StarlingMonkey); e.g. `--reps 3`.
bench-languages *ARGS:
    cargo bench -p routilux --bench languages -- {{ARGS}}

# Build the example plugins and fixtures for wasm32-wasip2.
plugins:
    rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

# Model-check the engine's quiescence and wake-up protocols with loom (the `protocol` crate
# only: the flag rebuilds it and loom, in a target directory of their own).
loom:
    RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p routilux-protocol --release

# Fuzz the targets that avoid wasmtime (items, flow files, terminal escaping), e.g. `just fuzz 600`.
fuzz SECONDS="60":
    scripts/fuzz {{SECONDS}}

# Fuzz component loading and the host imports (rebuilds wasmtime instrumented: ~10 min first).
fuzz-wasm SECONDS="60":
    scripts/fuzz --wasm {{SECONDS}}
