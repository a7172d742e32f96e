//! Registry faults through a fault-injecting proxy in front of the real registry: retries
//! with Retry-After, 503 bursts, a connection reset mid-blob (resumed by range), a blob
//! whose bytes do not match its digest, fail-fast 4xx, and bearer-token authentication.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::{Fault, Proxy};
use talaria_artifact::build::{self, BuildOptions};
use talaria_artifact::discover;
use talaria_artifact::format::{Knobs, Profile};
use talaria_artifact::oci::registry::credentials::{Credential, Credentials};
use talaria_artifact::oci::registry::{
    RegistryClient, RegistryConfig, RegistryError, Repository, RetryPolicy,
};
use talaria_artifact::oci::store::{RegistryStore, Store, StoreError};
use talaria_artifact::oci::{self, Platform};
use talaria_testenv::registry::Registry;

fn opts() -> BuildOptions {
    BuildOptions {
        platform: Platform::host(),
        profile: Profile::Default,
        knobs: Knobs {
            span_size: 256 * 1024,
            ..Knobs::default()
        },
        parallelism: 2,
        created: None,
        recorded: None,
        reuse: Default::default(),
    }
}

struct Setup {
    _reg: Registry,
    proxy: Proxy,
    image: talaria_testenv::images::Image,
    tars: Vec<Vec<u8>>,
    repo: Repository,
}

async fn setup(seed: u64) -> Setup {
    let reg = Registry::start().unwrap();
    let (image, tars) = common::test_image(seed);
    image.push(&reg.host(), "faults/app", "v1").unwrap();
    let proxy = Proxy::start(&reg.host()).await;
    let repo = Repository {
        registry: proxy.host(),
        name: "faults/app".into(),
    };
    Setup {
        _reg: reg,
        proxy,
        image,
        tars,
        repo,
    }
}

fn biggest_layer(s: &Setup) -> talaria_testenv::images::Layer {
    s.image
        .layers
        .iter()
        .max_by_key(|l| l.blob.len())
        .unwrap()
        .clone()
}

fn store(client: &RegistryClient, repo: &Repository) -> Arc<dyn Store> {
    Arc::new(RegistryStore::new(client.clone(), repo.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_honours_retry_after() {
    let s = setup(11).await;
    s.proxy.add(Fault::TooMany {
        path_part: "/manifests/v1".into(),
        count: 2,
        retry_after: 1,
    });
    let client = common::client();
    let raw = client.get_manifest(&s.repo, "v1").await.unwrap();
    assert_eq!(raw.digest, s.image.manifest_digest);
    let log: Vec<_> = s
        .proxy
        .log()
        .into_iter()
        .filter(|x| x.path.contains("/manifests/v1"))
        .collect();
    assert_eq!(
        log.iter().map(|x| x.status).collect::<Vec<_>>(),
        [429, 429, 200]
    );
    // Each retry waited for the Retry-After the registry asked for.
    for w in log.windows(2) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_bursts_are_retried_and_bounded() {
    let s = setup(12).await;
    // A burst on blobs during a build: the build still succeeds.
    s.proxy.add(Fault::Unavailable {
        path_part: "/blobs/".into(),
        count: 3,
    });
    let client = common::client();
    let st = store(&client, &s.repo);
    let b = build::build(st.clone(), "v1", None, &opts()).await.unwrap();
    assert_eq!(b.image.digest, s.image.manifest_digest);
    let injected = s
        .proxy
        .log()
        .iter()
        .filter(|x| x.injected && x.status == 503)
        .count();
    assert_eq!(injected, 3);

    // An outage longer than the retry budget fails with a clear message, after a bounded
    // number of attempts.
    s.proxy.clear();
    s.proxy.add(Fault::Unavailable {
        path_part: "/manifests/".into(),
        count: 1000,
    });
    let before = s.proxy.log().len();
    let tight = common::client_with(RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        max_elapsed: Duration::from_secs(10),
    });
    let err = tight.get_manifest(&s.repo, "v1").await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Exhausted { attempts: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    assert_eq!(s.proxy.log().len() - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_blob_resumes_with_a_range_request() {
    let s = setup(13).await;
    // Cut the biggest layer's download once, well inside the blob.
    let big = biggest_layer(&s);
    let cut = big.blob.len() / 3;
    s.proxy.add(Fault::ResetAfter {
        path_part: big.digest.clone(),
        after: cut,
        count: 1,
    });
    let client = common::client();
    let st = store(&client, &s.repo);
    let b = build::build(st.clone(), "v1", None, &opts()).await.unwrap();
    let log = s.proxy.log();
    let blob_gets: Vec<_> = log
        .iter()
        .filter(|x| x.method == "GET" && x.path.contains(&big.digest))
        .collect();
    assert!(blob_gets[0].injected, "the first download was cut");
    let resumed = blob_gets
        .iter()
        .find(|x| x.range.is_some())
        .expect("a resumed ranged GET");
    let from: u64 = resumed
        .range
        .as_deref()
        .unwrap()
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from <= cut as u64, "resumed from {from}");

    // The artifact is complete and correct: every file reads back.
    let im = common::image_manifest(st.as_ref(), "v1").await;
    let n = common::check_read_through(
        st.as_ref(),
        st.as_ref(),
        &im,
        &b.artifact.digest,
        &common::unpack_merged(&s.tars),
    )
    .await;
    assert!(n >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_range_hands_out_its_bytes_and_reports_a_cut_body() {
    let s = setup(17).await;
    let big = biggest_layer(&s);
    let client = common::client();
    let (off, len) = (100usize, big.blob.len() / 2);
    let want = &big.blob[off..off + len];
    let read_all = |mut body: talaria_artifact::oci::registry::RangeStream| async move {
        let mut got = Vec::new();
        loop {
            match body.next_piece().await {
                Ok(Some(p)) => got.extend_from_slice(&p),
                Ok(None) => return (got, None),
                Err(e) => return (got, Some(e)),
            }
        }
    };
    let open = || client.get_blob_range_stream(&s.repo, &big.digest, off as u64, len as u64);
    let (got, err) = read_all(open().await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == want, "the range, whole");

    // A body cut partway is an error, never a short range; what came is right, and the
    // rest reads with a ranged GET.
    s.proxy.add(Fault::ResetRangeAfter {
        path_part: big.digest.clone(),
        after: len / 3,
        count: 1,
    });
    let (got, err) = read_all(open().await.unwrap()).await;
    let err = err.expect("a cut body is an error");
    assert!(
        matches!(
            err,
            RegistryError::Transport { .. } | RegistryError::SizeMismatch { .. }
        ),
        "{err}"
    );
    assert!(
        got.len() < len && got[..] == want[..got.len()],
        "a right prefix"
    );
    let rest = client
        .get_blob_range(
            &s.repo,
            &big.digest,
            (off + got.len()) as u64,
            (len - got.len()) as u64,
        )
        .await
        .unwrap();
    assert!(rest[..] == want[got.len()..]);
    // A range past the blob's end is refused by the registry, not read short.
    assert!(
        client
            .get_blob_range_stream(&s.repo, &big.digest, big.blob.len() as u64, 10)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_fails_clearly_and_leaves_no_artifact() {
    let s = setup(14).await;
    let victim = s.image.layers[1].digest.clone();
    s.proxy.add(Fault::Corrupt {
        path_part: victim.clone(),
    });
    let client = common::client();
    let st = store(&client, &s.repo);
    let err = build::build(st.clone(), "v1", None, &opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&victim), "{msg}");
    assert!(msg.contains("digest"), "{msg}");

    // No partial artifact: nothing resolves, no referrers tag exists.
    s.proxy.clear();
    assert!(
        discover::resolve(st.as_ref(), &s.image.manifest_digest)
            .await
            .unwrap()
            .is_none()
    );
    let tag = oci::referrers_tag(&s.image.manifest_digest).unwrap();
    let e = st.get_manifest(&tag).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // A whole-blob read of a corrupt blob is refused too.
    s.proxy.add(Fault::Corrupt {
        path_part: victim.clone(),
    });
    let e = client
        .get_blob(&s.repo, &victim, 64 << 20)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_client_errors_fail_at_once_with_the_registry_message() {
    let s = setup(15).await;
    let client = common::client();
    let e = client
        .get_manifest(&s.repo, "no-such-tag")
        .await
        .unwrap_err();
    match &e {
        RegistryError::Status {
            status, message, ..
        } => {
            assert_eq!(*status, 404);
            assert!(message.contains("MANIFEST_UNKNOWN"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    let hits = s
        .proxy
        .log()
        .iter()
        .filter(|x| x.path.contains("no-such-tag"))
        .count();
    assert_eq!(hits, 1, "a 404 is not retried");
    let se: StoreError = e.into();
    assert!(se.is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_challenge_with_basic_credentials() {
    let s = setup(16).await;
    s.proxy.add(Fault::Bearer {
        user: "alice".into(),
        password: "pw".into(),
        token: "tok-123".into(),
    });
    // Anonymous: the token endpoint refuses, the error says so.
    let anon = common::client();
    let e = anon.get_manifest(&s.repo, "v1").await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Auth { .. }),
        "anonymous should fail auth: {e}"
    );

    // Credentials from a docker config.json.
    let cfg = format!(
        r#"{{"auths":{{"{}":{{"username":"alice","password":"pw"}}}}}}"#,
        s.proxy.host()
    );
    let creds = Credentials::from_docker_config_json(cfg.as_bytes()).unwrap();
    assert!(matches!(
        creds.get(&s.proxy.host()),
        Credential::Basic { .. }
    ));
    let client = RegistryClient::new(RegistryConfig {
        credentials: creds,
        ..RegistryConfig::default()
    })
    .unwrap();
    let st = store(&client, &s.repo);
    let b = build::build(st.clone(), "v1", None, &opts()).await.unwrap();
    let found = discover::resolve(st.as_ref(), &s.image.manifest_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.descriptor.digest, b.artifact.digest);
    // One token fetch per (repository, pull/push) at most, not one per request.
    let token_calls = s
        .proxy
        .log()
        .iter()
        .filter(|x| x.path.starts_with("/token") && x.status == 200)
        .count();
    assert!(
        (1..=4).contains(&token_calls),
        "{token_calls} token requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_while_the_registry_restarts_is_retried() {
    let mut reg = Registry::start().unwrap();
    let (image, _) = common::test_image(17);
    image.push(&reg.host(), "faults/restart", "v1").unwrap();
    let repo = Repository {
        registry: reg.host(),
        name: "faults/restart".into(),
    };
    reg.stop();
    let client = common::client_with(RetryPolicy {
        max_attempts: 40,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        max_elapsed: Duration::from_secs(60),
    });
    let pull = {
        let client = client.clone();
        let repo = repo.clone();
        tokio::spawn(async move { client.get_manifest(&repo, "v1").await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!pull.is_finished(), "the pull is waiting for the registry");
    // Keep the restarted registry alive (and stopped on drop) until the pull is done.
    let _reg = tokio::task::spawn_blocking(move || {
        reg.start_again().unwrap();
        reg
    })
    .await
    .unwrap();
    let raw = pull.await.unwrap().unwrap();
    assert_eq!(raw.digest, image.manifest_digest);
}
