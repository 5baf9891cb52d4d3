//! The `dccsign` command line.
#![forbid(unsafe_code)]

mod cli;

/// mimalloc instead of the C library's allocator, for the daemon and the load generator
/// (see docs/benchmarks.md, "Sixteenth session").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::run()
}
