//! Tests of the shared controller plumbing: relists, the owner index, backoff and the failure memory.

use super::*;

#[tokio::test]
async fn a_relist_wakes_for_what_it_changed_once_the_store_holds_it() {
    use k8s_openapi::api::core::v1::Pod;
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    let pod = |name: &str, rv: Option<&str>| {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        p.metadata.resource_version = rv.map(Into::into);
        p
    };
    let events = |gone| {
        let (store, writer) = reflector::store();
        let evs = [
            // The first list wakes for everything.
            Init,
            InitApply(pod("same", Some("1"))),
            InitApply(pod("changed", Some("2"))),
            InitApply(pod("deleted", Some("3"))),
            InitApply(pod("unversioned", None)),
            InitDone,
            Apply(pod("applied", Some("4"))),
            Delete(pod("applied", Some("5"))),
            // A relist: only what it changed, with what went while the watch was down.
            Init,
            InitApply(pod("same", Some("1"))),
            InitApply(pod("changed", Some("7"))),
            InitApply(pod("new", Some("8"))),
            InitApply(pod("unversioned", None)),
            InitDone,
            // A relist that finds the world unchanged wakes nobody.
            Init,
            InitApply(pod("same", Some("1"))),
            InitApply(pod("changed", Some("7"))),
            InitApply(pod("new", Some("8"))),
            InitApply(pod("unversioned", Some("9"))),
            InitDone,
        ];
        let raw = futures::stream::iter(evs.map(Ok));
        let stream = woken(reflector::reflector(writer, raw), store.clone(), gone);
        async move {
            let mut seen = Vec::new();
            futures::pin_mut!(stream);
            while let Some(p) = stream.next().await {
                let p = p.unwrap();
                // What wakes a reconcile is what the store holds (or no longer holds).
                if let Some(held) = store.get(&ObjectRef::from_obj(&p)) {
                    let rv = &held.metadata.resource_version;
                    assert_eq!(rv, &p.metadata.resource_version, "{}", p.name_any());
                }
                seen.push(p.name_any());
            }
            seen
        }
    };
    let mut first = events(Gone::Wake).await;
    let relist = first.split_off(6);
    first.sort();
    assert_eq!(
        first,
        [
            "applied",
            "applied",
            "changed",
            "deleted",
            "same",
            "unversioned"
        ]
    );
    let mut relist = relist;
    let unchanged = relist.split_off(4);
    relist.sort();
    assert_eq!(relist, ["changed", "deleted", "new", "unversioned"]);
    assert_eq!(unchanged, ["unversioned"]);
    // Parents: nothing that is gone.
    let parents = events(Gone::Skip).await;
    assert_eq!(
        parents.iter().filter(|n| *n == "deleted").count(),
        1,
        "{parents:?}"
    );
    assert_eq!(parents.iter().filter(|n| *n == "applied").count(), 1);
}

#[test]
fn the_owner_index_follows_the_watch_and_swaps_on_relist() {
    use k8s_openapi::api::core::v1::Pod;
    let pod = |name: &str, owner: &str| {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        p.metadata.labels = Some([(LABEL_OWNER_NAME.to_string(), owner.to_string())].into());
        p
    };
    let idx = OwnerIndex::default();
    idx.apply(&watcher::Event::Apply(pod("a-0", "a")));
    idx.apply(&watcher::Event::Apply(pod("a-1", "a")));
    idx.apply(&watcher::Event::Apply(pod("b-0", "b")));
    assert_eq!(idx.names("ns", "a"), ["a-0", "a-1"]);
    idx.apply(&watcher::Event::Delete(pod("a-0", "a")));
    assert_eq!(idx.names("ns", "a"), ["a-1"]);
    assert!(idx.names("other", "a").is_empty());
    // A relist serves the old index until it is complete, then only what it listed.
    idx.apply(&watcher::Event::<Pod>::Init);
    idx.apply(&watcher::Event::InitApply(pod("b-0", "b")));
    assert_eq!(idx.names("ns", "a"), ["a-1"]);
    idx.apply(&watcher::Event::<Pod>::InitDone);
    assert!(idx.names("ns", "a").is_empty());
    assert_eq!(idx.names("ns", "b"), ["b-0"]);
}

/// A store that says it is listed is not enough: the index must have its list too.
#[tokio::test]
async fn a_child_store_is_ready_once_store_and_index_are_listed() {
    use k8s_openapi::api::core::v1::Pod;
    let (reader, mut writer) = reflector::store::<Pod>();
    let cache = ChildStore {
        store: reader,
        index: OwnerIndex::default(),
    };
    let mut pod = Pod::default();
    pod.metadata.name = Some("a-0".into());
    pod.metadata.namespace = Some("ns".into());
    pod.metadata.labels = Some([(LABEL_OWNER_NAME.to_string(), "a".to_string())].into());
    for ev in [
        watcher::Event::Init,
        watcher::Event::InitApply(pod.clone()),
        watcher::Event::InitDone,
    ] {
        writer.apply_watcher_event(&ev);
    }
    let short = Duration::from_millis(50);
    assert!(
        tokio::time::timeout(short, cache.wait_until_ready())
            .await
            .is_err(),
        "ready while the index has no list"
    );
    cache.index.apply(&watcher::Event::<Pod>::Init);
    cache.index.apply(&watcher::Event::InitApply(pod));
    assert!(tokio::time::timeout(short, cache.wait_until_ready())
        .await
        .is_err());
    cache.index.apply(&watcher::Event::<Pod>::InitDone);
    tokio::time::timeout(short, cache.wait_until_ready())
        .await
        .expect("ready")
        .expect("writer alive");
    assert_eq!(children_of(&cache, "ns", "a").len(), 1);
}

#[test]
fn watch_backoff_doubles_to_five_seconds_and_resets() {
    use kube::runtime::utils::Backoff;
    let mut b = WatchBackoff::default();
    let d: Vec<Duration> = (0..8).map(|_| b.next().unwrap_or_default()).collect();
    for (got, max) in d
        .iter()
        .zip([250u64, 500, 1000, 2000, 4000, 5000, 5000, 5000])
    {
        let max = Duration::from_millis(max);
        assert!(
            *got <= max && *got >= max.mul_f64(0.75),
            "{got:?} vs {max:?}"
        );
    }
    b.reset();
    assert!(b.next().unwrap_or_default() <= Duration::from_millis(250));
}

#[tokio::test]
async fn every_reconcile_waiting_for_the_caches_wakes() {
    use k8s_openapi::api::core::v1::Pod;
    let (reader, mut writer) = reflector::store::<Pod>();
    let synced = {
        let r = reader.clone();
        Synced::spawn(async move { r.wait_until_ready().await })
    };
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let s = synced.clone();
            tokio::spawn(async move { s.wait().await })
        })
        .collect();
    tokio::task::yield_now().await;
    assert!(!synced.is_ready());
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    for w in waiters {
        let r = tokio::time::timeout(Duration::from_secs(5), w).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "a waiter was not woken");
    }
    assert!(synced.is_ready());
}

#[tokio::test]
async fn caches_are_synced_once_every_controller_has_listed() {
    let uri: http::Uri = "http://127.0.0.1:9".parse().unwrap();
    let client = Client::try_from(kube::Config::new(uri)).unwrap();
    let shared = Shared::new(client);
    shared.expect_controllers(2);
    assert!(!shared.caches_synced(), "nothing registered yet");
    let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
    let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
    let (s1, s2) = (Synced::spawn(rx1), Synced::spawn(rx2));
    shared.track(s1.clone());
    shared.track(s2.clone());
    assert!(!shared.caches_synced());
    tx1.send(()).unwrap();
    s1.wait().await.unwrap();
    assert!(!shared.caches_synced(), "one controller still listing");
    tx2.send(()).unwrap();
    s2.wait().await.unwrap();
    assert!(shared.caches_synced());
}

#[tokio::test]
async fn a_closed_cache_fails_the_waiters() {
    use k8s_openapi::api::core::v1::Pod;
    let (reader, writer) = reflector::store::<Pod>();
    let synced = Synced::spawn(async move { reader.wait_until_ready().await });
    drop(writer);
    let r = tokio::time::timeout(Duration::from_secs(5), synced.wait()).await;
    assert!(matches!(r, Ok(Err(Error::CacheClosed(_)))));
}

#[test]
fn backoff_doubles_and_caps() {
    assert_eq!(backoff_delay(1), Duration::from_secs(1));
    assert_eq!(backoff_delay(2), Duration::from_secs(2));
    assert_eq!(backoff_delay(5), Duration::from_secs(16));
    assert_eq!(backoff_delay(20), MAX_BACKOFF);
    assert_eq!(backoff_delay(200), MAX_BACKOFF);
}

#[tokio::test]
async fn the_failure_memory_of_a_gone_object_is_dropped() {
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let shared = Shared::new(client);
    assert_eq!(
        shared.backoff("TrainingJob/ns/gone"),
        Duration::from_secs(1)
    );
    assert_eq!(
        shared.backoff("TrainingJob/ns/gone"),
        Duration::from_secs(2)
    );
    assert_eq!(shared.failing(), 1);
    // Long after its last failure, another object's failure sweeps it.
    if let Ok(mut f) = shared.failures.lock() {
        for (_, at) in f.values_mut() {
            *at -= 2 * MAX_BACKOFF;
        }
    }
    assert_eq!(
        shared.backoff("TrainingJob/ns/other"),
        Duration::from_secs(1)
    );
    assert_eq!(shared.failing(), 1);
    shared.succeeded("TrainingJob/ns/other");
    assert_eq!(shared.failing(), 0);
}
