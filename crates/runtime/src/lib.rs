//! What every Sluice service shares: typed membership keys and [`WorkerInfo`], the
//! [`Membership`] trait (etcd and embedded), the [`WorkerDirectory`] built on its watch, cache
//! transfer ([`CacheTransport`], TCP and in-process) with the decode side's [`CacheInbox`],
//! remote expert dispatch, gRPC serving plumbing (health, reflection, deadlines) and
//! telemetry. Services stay thin on top of it.

pub mod attempt_key;
pub mod cli;
pub mod directory;
pub mod engine_thread;
pub mod error;
pub mod estimate;
pub mod experts;
pub mod grammar;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod model_host;
pub mod sampling;
pub mod serve;
pub mod service_args;
pub mod status;
pub mod telemetry;
pub mod transport;
pub mod wire;
pub mod worker_info;

pub use attempt_key::AttemptKey;
pub use directory::WorkerDirectory;
pub use error::{Result, RuntimeError};
pub use experts::RemoteExperts;
pub use keys::{PlacementKey, Role, WorkerId, WorkerKey};
pub use membership::{
    EmbeddedMembership, EtcdMembership, ExpertPlacement, Membership, Registration, WorkerEvent,
};
pub use transport::{CacheInbox, CacheTransport, Destination, Handoff, InboxLimits, TransportKind};
pub use worker_info::{ExpertShardInfo, WorkerInfo};
