//! The devkit's integration tests, as one test binary: each former `devkit/tests/<name>.rs` is a
//! module here, and `sim_support` is compiled once. One binary links the devkit, the handler's
//! library and their dependencies once instead of once per file (docs/benchmarks.md, "CI time").
//! The tests share one process: none of them changes the environment or installs a global log
//! subscriber, and every server listens on port 0. Adding a file: `tests/README.md`.

#[path = "../sim_support/mod.rs"]
mod sim_support;

mod aoai_media;
mod aoai_responses;
mod aoai_sim;
mod content_safety_sim;
mod gateway;
mod launcher;
mod readme_demo;
mod rewrite_rules;
