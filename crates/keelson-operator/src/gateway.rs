//! Gateway API pieces that more than one kind writes: the parents a route attaches to, in
//! HTTPRoute's and GRPCRoute's types. Pure; no route is built or written here.

use gateway_api::grpcroutes::GrpcRouteParentRefs;
use gateway_api::httproutes::HttpRouteParentRefs;
use keelson_api::modeldeployment::ParentRef;

/// `refs` as an HTTPRoute's `parentRefs`.
pub fn http_parent_refs(refs: &[ParentRef]) -> Vec<HttpRouteParentRefs> {
    refs.iter()
        .map(|p| HttpRouteParentRefs {
            group: p.group.clone(),
            kind: p.kind.clone(),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            section_name: p.section_name.clone(),
            port: None,
        })
        .collect()
}

/// `refs` as a GRPCRoute's `parentRefs`: the same fields as [`http_parent_refs`].
pub fn grpc_parent_refs(refs: &[ParentRef]) -> Vec<GrpcRouteParentRefs> {
    http_parent_refs(refs)
        .into_iter()
        .map(|p| GrpcRouteParentRefs {
            group: p.group,
            kind: p.kind,
            name: p.name,
            namespace: p.namespace,
            section_name: p.section_name,
            port: p.port,
        })
        .collect()
}
