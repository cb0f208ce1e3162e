//! The `reload.v1` gRPC API: the product's contract with the CLI and with
//! deploy pipelines written in any language.
//!
//! The `.proto` files under `reload/v1/` are the source of truth and carry
//! the field-by-field documentation; this crate only compiles them (with
//! `protox`, so cargo alone builds it) and re-exports the generated tonic
//! clients, servers and prost messages. Nothing else lives here: signing is
//! in `reload-artifact`, the handlers in `reload-agent`, the callers in
//! `reloadctl`.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("reload.v1");

    /// The encoded `FileDescriptorSet` of every `reload.v1` file, for gRPC
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/reload_v1_descriptor.bin"));

    /// The trailer an agent sets on an ABORTED answer to a call whose
    /// fencing token was superseded (see `leases.proto`), with the value
    /// [`FENCE_SUPERSEDED`]: a rollout that sees it must stop for good,
    /// where another ABORTED (a busy service) may be retried.
    pub const FENCE_TRAILER: &str = "reload-fence";
    pub const FENCE_SUPERSEDED: &str = "superseded";
}

pub use prost_types;
