//! The kernel programs live in the `circuit` binary target (src/main.rs). This empty library
//! exists so circuit-agent can list this crate as a build-dependency: cargo then rebuilds the
//! agent, which embeds the object, whenever the programs change.
#![no_std]
