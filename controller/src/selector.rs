//! Which images a policy selects: image reference patterns (globs on `registry/repository:tag`
//! with Docker Hub normalization) and Kubernetes label selectors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use talaria_artifact::oci::registry::ImageRef;

/// A container image reference in canonical form: `docker.io/library/busybox:latest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NormalizedRef {
    /// Registry host (`docker.io`, `registry.example.com:5000`).
    pub registry: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// Tag; `latest` when the reference has neither tag nor digest.
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl NormalizedRef {
    /// `registry/repository`.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag` or `registry/repository@digest` (what patterns match on).
    pub fn matchable(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{}:{t}", self.repo()),
            (None, Some(d)) => format!("{}@{d}", self.repo()),
            (None, None) => self.repo(),
        }
    }

    /// The tag or digest to fetch: the digest wins when both are given (as container runtimes do).
    pub fn reference(&self) -> String {
        self.digest
            .clone()
            .or_else(|| self.tag.clone())
            .unwrap_or_else(|| "latest".into())
    }

    /// The reference as named, tag and digest both when given: `registry/repository:tag@digest`.
    pub fn named(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => format!("{}:{t}@{d}", self.repo()),
            _ => self.fetchable(),
        }
    }

    /// The full reference to fetch: `registry/repository@digest` or `...:tag`.
    pub fn fetchable(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}@{d}", self.repo()),
            None => format!("{}:{}", self.repo(), self.reference()),
        }
    }
}

/// Normalizes a container image reference as the container runtime would: Docker Hub is the
/// default registry (`docker.io`), its single-component names live under `library/`, and the
/// tag defaults to `latest`. Returns `None` for references that cannot be valid. Parsed by
/// the artifact crate's [`ImageRef`] (the docker reference grammar), the one parser the
/// controller and the nodes share; only the Docker Hub host is spelled as users write it.
pub fn normalize(reference: &str) -> Option<NormalizedRef> {
    let s = reference.trim();
    if s.is_empty() || s.len() > 4096 || s.chars().any(|c| c.is_whitespace()) {
        return None;
    }
    let r = ImageRef::parse(s).ok()?;
    let registry = match r.repository.registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    };
    let digest = r.digest.map(|d| d.to_ascii_lowercase());
    let tag = if r.tag.is_none() && digest.is_none() {
        Some("latest".to_string())
    } else {
        r.tag
    };
    Some(NormalizedRef {
        registry,
        repository: r.repository.name,
        tag,
        digest,
    })
}

/// Whether the first path component of a pattern names a registry host (docker's rule).
fn is_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// An image reference pattern: `*` matches within a path segment (not `/`), `**` across
/// segments. A pattern without a tag or digest matches every tag and digest of the
/// repositories it matches. Docker Hub shorthand is normalized (`postgres:16*` is
/// `docker.io/library/postgres:16*`) unless the first component holds a wildcard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    glob: String,
    /// The pattern names no tag or digest: match on the repository only.
    repo_only: bool,
}

impl Pattern {
    pub fn parse(pattern: &str) -> Pattern {
        let p = pattern.trim();
        let last = p.rsplit('/').next().unwrap_or(p);
        let repo_only = !last.contains(':') && !p.contains('@');
        // The first component, without a tag when the pattern has a single component.
        let first = match p.split_once('/') {
            Some((f, _)) => f,
            None => p.split([':', '@']).next().unwrap_or(p),
        };
        let glob = if first.contains('*') {
            p.to_string()
        } else {
            let (registry, rest) = match p.split_once('/') {
                Some((f, r)) if is_host(f) => (f.to_string(), r.to_string()),
                _ => ("docker.io".to_string(), p.to_string()),
            };
            let registry = match registry.as_str() {
                "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
                _ => registry,
            };
            let repo_part = rest.split([':', '@']).next().unwrap_or(&rest);
            if registry == "docker.io" && !repo_part.contains('/') && !repo_part.contains('*') {
                format!("{registry}/library/{rest}")
            } else {
                format!("{registry}/{rest}")
            }
        };
        Pattern { glob, repo_only }
    }

    pub fn matches(&self, r: &NormalizedRef) -> bool {
        if self.repo_only {
            glob_match(self.glob.as_bytes(), r.repo().as_bytes())
        } else {
            glob_match(self.glob.as_bytes(), r.matchable().as_bytes())
                || (r.tag.is_some()
                    && r.digest.is_some()
                    && glob_match(
                        self.glob.as_bytes(),
                        format!("{}@{}", r.repo(), r.digest.as_deref().unwrap_or("")).as_bytes(),
                    ))
        }
    }
}

/// Glob match with `*` (no `/`) and `**` (anything). Iterative with bounded backtracking
/// over pattern positions (memoized), so hostile patterns stay O(len(p) * len(s)).
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // dp[j] = pattern prefix p[..i] matches s[..j]; rolled over i.
    let mut dp = vec![false; s.len() + 1];
    dp[0] = true;
    let mut i = 0;
    while i < p.len() {
        let mut next = vec![false; s.len() + 1];
        if p[i] == b'*' {
            let double = p.get(i + 1) == Some(&b'*');
            // Star: next[j] = dp[k] for some k <= j with s[k..j] free of '/' (unless **).
            let mut reach = false;
            for j in 0..=s.len() {
                if dp[j] {
                    reach = true;
                }
                next[j] = reach;
                if j < s.len() && s[j] == b'/' && !double {
                    reach = false;
                }
            }
            i += if double { 2 } else { 1 };
        } else {
            for j in 0..s.len() {
                next[j + 1] = dp[j] && s[j] == p[i];
            }
            i += 1;
        }
        dp = next;
    }
    dp[s.len()]
}

/// Whether a label set satisfies a Kubernetes label selector (an empty selector matches all).
/// Unknown operators match nothing, so a typo never widens a selection.
pub fn labels_match(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if let Some(ml) = &sel.match_labels
        && ml.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    for e in sel.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or(&[]);
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn n(s: &str) -> NormalizedRef {
        normalize(s).unwrap_or_else(|| panic!("{s} should normalize"))
    }

    #[test]
    fn docker_hub_normalization() {
        assert_eq!(n("busybox").matchable(), "docker.io/library/busybox:latest");
        assert_eq!(n("user/app:1").matchable(), "docker.io/user/app:1");
        assert_eq!(
            n("index.docker.io/library/redis:7").matchable(),
            "docker.io/library/redis:7"
        );
        assert_eq!(
            n("127.0.0.1:5000/a/b:v1").matchable(),
            "127.0.0.1:5000/a/b:v1"
        );
        assert_eq!(n("localhost/x").matchable(), "localhost/x:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = n(&format!("reg.io/x:1@{d}"));
        assert_eq!(r.reference(), d);
        assert_eq!(r.fetchable(), format!("reg.io/x@{d}"));
        let d = format!("sha256:{}", "a".repeat(64));
        let both = normalize(&format!("reg.io/x:1@{d}")).expect("tag and digest");
        assert_eq!(both.named(), format!("reg.io/x:1@{d}"));
        assert_eq!(both.fetchable(), format!("reg.io/x@{d}"));
        assert_eq!(
            normalize("x").expect("hub").named(),
            "docker.io/library/x:latest"
        );
        assert_eq!(normalize(""), None);
        assert_eq!(normalize("reg.io/x@sha256:zz"), None);
        assert_eq!(normalize("reg.io/X:1"), None);
        assert_eq!(normalize("reg.io//x"), None);
    }

    #[test]
    fn patterns() {
        let p = Pattern::parse("registry.example.com/ml/**");
        assert!(p.matches(&n("registry.example.com/ml/a/b:1")));
        assert!(!p.matches(&n("registry.example.com/web/a:1")));
        let p = Pattern::parse("postgres:16*");
        assert!(p.matches(&n("postgres:16.2")));
        assert!(p.matches(&n("docker.io/library/postgres:16")));
        assert!(!p.matches(&n("postgres:15")));
        let p = Pattern::parse("reg.io/team/*");
        assert!(p.matches(&n("reg.io/team/app:v1")));
        assert!(!p.matches(&n("reg.io/team/sub/app:v1")));
        let p = Pattern::parse("reg.io/team/app");
        assert!(p.matches(&n("reg.io/team/app:anything")));
        let p = Pattern::parse("**");
        assert!(p.matches(&n("busybox")));
        let p = Pattern::parse("*/library/busybox:*");
        assert!(p.matches(&n("busybox:1.36")));
        let p = Pattern::parse("reg.io/app:v1");
        assert!(p.matches(&n(&format!("reg.io/app:v1@sha256:{}", "b".repeat(64)))));
    }

    #[test]
    fn glob_is_not_exponential() {
        let p = "*a".repeat(50) + "b";
        let s = "a".repeat(3000);
        assert!(!glob_match(p.as_bytes(), s.as_bytes()));
    }

    #[test]
    fn label_selectors() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())]
            .into_iter()
            .collect();
        let mut sel = LabelSelector::default();
        assert!(labels_match(&sel, &labels));
        sel.match_labels = Some([("app".to_string(), "web".to_string())].into());
        assert!(labels_match(&sel, &labels));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "DoesNotExist".into(),
            values: None,
        }]);
        assert!(labels_match(&sel, &labels));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "NotIn".into(),
            values: Some(vec!["web".into()]),
        }]);
        assert!(!labels_match(&sel, &labels));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "Bogus".into(),
            values: None,
        }]);
        assert!(!labels_match(&sel, &labels));
    }
}
