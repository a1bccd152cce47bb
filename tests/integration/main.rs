//! Integration tests: the real operator against the real local API server (see the keelson-testkit crate).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

mod argocd;
mod crds;
mod events;
mod examples;
mod gang;
mod gitops;
mod grpc;
mod kueue;
mod leader;
mod modeldeployment;
mod notebook;
mod rollout;
mod serving;
mod trainingjob;
mod trainingjob_shape;
