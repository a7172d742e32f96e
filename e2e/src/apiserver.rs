//! A real Kubernetes control plane: etcd + kube-apiserver with generated certificates and
//! RBAC, plus kube-controller-manager on request (garbage collection of owned objects,
//! namespace deletion, default service accounts).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use tempfile::TempDir;

use crate::process::Proc;
use crate::{EnvError, free_port, http, tool};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// How to start the control plane.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Also run kube-controller-manager with `controllers`.
    pub controller_manager: bool,
    /// Controllers to enable in kube-controller-manager (its `--controllers` names).
    pub controllers: Vec<String>,
    /// Serve on every address and advertise this one (the `kubernetes` Service's endpoint),
    /// so pods reach the apiserver; `None`: loopback only.
    pub advertise_address: Option<Ipv4Addr>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            controller_manager: false,
            controllers: [
                "garbage-collector-controller",
                "namespace-controller",
                "serviceaccount-controller",
            ]
            .map(String::from)
            .to_vec(),
            advertise_address: None,
        }
    }
}

impl KubeOptions {
    /// Defaults plus kube-controller-manager.
    pub fn with_controller_manager() -> Self {
        KubeOptions {
            controller_manager: true,
            ..Default::default()
        }
    }
}

/// The CA that signs serving and client certificates.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

/// A running etcd + kube-apiserver (+ kube-controller-manager). Dropping it stops them and
/// removes certificates, data and logs.
pub struct KubeApi {
    // Drop order: controller-manager, apiserver, etcd, then the files.
    kcm: Option<Proc>,
    apiserver: Proc,
    etcd: Proc,
    ca: Ca,
    port: u16,
    kubeconfig: PathBuf,
    dir: TempDir,
}

impl KubeApi {
    /// etcd + kube-apiserver, no controller-manager.
    pub async fn start() -> Result<KubeApi, EnvError> {
        KubeApi::start_with(KubeOptions::default()).await
    }

    /// Starts the control plane and waits until `/readyz` is OK (and, with the controller-
    /// manager, until it created the `default` ServiceAccount, which shows it is working).
    pub async fn start_with(opts: KubeOptions) -> Result<KubeApi, EnvError> {
        // Free ports can be taken by a parallel test between probing and binding; retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match KubeApi::start_once(&opts).await {
                Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                    tracing::warn!(error = %e, "port race while starting the control plane; retrying");
                }
                other => return other,
            }
        }
    }

    async fn start_once(opts: &KubeOptions) -> Result<KubeApi, EnvError> {
        let etcd_bin = tool("etcd")?;
        let apiserver_bin = tool("kube-apiserver")?;
        let kcm_bin = if opts.controller_manager {
            Some(tool("kube-controller-manager")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("talaria-kube-")
            .tempdir()
            .map_err(|e| EnvError::io("creating the kube temp dir", e))?;
        let d = dir.path();
        let pki = d.join("pki");
        std::fs::create_dir_all(&pki)
            .map_err(|e| EnvError::io(format!("creating {}", pki.display()), e))?;

        // Certificates.
        let ca = new_ca()?;
        let ca_pem = ca.params.self_signed(&ca.key)?.pem();
        write(&pki.join("ca.crt"), &ca_pem)?;
        let mut names = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "10.96.0.1".to_string(),
        ];
        names.extend(opts.advertise_address.map(|a| a.to_string()));
        let mut serving = CertificateParams::new(names)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca.issuer())?;
        write(&pki.join("apiserver.crt"), &serving_cert.pem())?;
        write(&pki.join("apiserver.key"), &serving_key.serialize_pem())?;
        let sa_key = KeyPair::generate()?;
        write(&pki.join("sa.key"), &sa_key.serialize_pem())?;
        write(&pki.join("sa.pub"), &sa_key.public_key_pem())?;

        // etcd.
        let etcd_data = d.join("etcd");
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(etcd_bin);
        etcd_cmd
            .arg("--name=default")
            .arg(format!("--data-dir={}", etcd_data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut etcd = Proc::spawn("etcd", etcd_cmd, &d.join("etcd.log"))?;
        let etcd_host = format!("127.0.0.1:{client_port}");
        let started = Instant::now();
        loop {
            etcd.check_alive()?;
            let host = etcd_host.clone();
            let ok = tokio::task::spawn_blocking(move || {
                http::request(&host, "GET", "/health", &[], &[], Duration::from_secs(2))
            })
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|r| r.status == 200 && r.text().contains("true"));
            if ok {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(etcd.timeout("GET /health", READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // kube-apiserver.
        let port = free_port()?;
        let p = |name: &str| pki.join(name).display().to_string();
        let mut api_cmd = Command::new(apiserver_bin);
        api_cmd
            .arg(format!("--etcd-servers={client_url}"))
            .arg(match opts.advertise_address {
                Some(_) => "--bind-address=0.0.0.0",
                None => "--bind-address=127.0.0.1",
            })
            .arg(format!(
                "--advertise-address={}",
                opts.advertise_address.unwrap_or(Ipv4Addr::LOCALHOST)
            ))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", p("")))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false");
        if !opts.controller_manager {
            // Nobody creates "default" ServiceAccounts without the controller-manager; the
            // admission plugin would then reject every Pod.
            api_cmd.arg("--disable-admission-plugins=ServiceAccount");
        }
        let apiserver = Proc::spawn("kube-apiserver", api_cmd, &d.join("kube-apiserver.log"))?;

        let mut api = KubeApi {
            kcm: None,
            apiserver,
            etcd,
            ca,
            port,
            kubeconfig: d.join("admin.kubeconfig"),
            dir,
        };
        let admin = api.write_kubeconfig("admin", "talaria-admin", &["system:masters"])?;
        debug_assert_eq!(admin, api.kubeconfig);

        let client = api.client().await?;
        let started = Instant::now();
        loop {
            api.apiserver.check_alive()?;
            api.etcd.check_alive()?;
            let req = http_request("/readyz");
            if client.request_text(req).await.is_ok() {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(api.apiserver.timeout("/readyz OK", READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        if let Some(kcm_bin) = kcm_bin {
            let mut kcm_cmd = Command::new(kcm_bin);
            kcm_cmd
                .arg(format!("--kubeconfig={}", api.kubeconfig.display()))
                .arg(format!("--controllers={}", opts.controllers.join(",")))
                .arg("--leader-elect=false")
                .arg("--use-service-account-credentials=false")
                .arg("--secure-port=0")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    p("sa.key")
                ))
                .arg(format!("--root-ca-file={}", p("ca.crt")));
            let kcm = Proc::spawn(
                "kube-controller-manager",
                kcm_cmd,
                &api.dir.path().join("kube-controller-manager.log"),
            )?;
            api.kcm = Some(kcm);
            if opts
                .controllers
                .iter()
                .any(|c| c == "serviceaccount-controller")
            {
                api.wait_for_default_service_account(&client).await?;
            }
        }
        Ok(api)
    }

    async fn wait_for_default_service_account(
        &mut self,
        client: &kube::Client,
    ) -> Result<(), EnvError> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sas: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), "default");
        let started = Instant::now();
        loop {
            if let Some(kcm) = self.kcm.as_mut() {
                kcm.check_alive()?;
            }
            if let Ok(Some(_)) = sas.get_opt("default").await {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let err = match &self.kcm {
                    Some(k) => k.timeout("ServiceAccount default/default created", READY_TIMEOUT),
                    None => self
                        .apiserver
                        .timeout("ServiceAccount default/default", READY_TIMEOUT),
                };
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The apiserver's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A kubeconfig file for a cluster-admin (`system:masters`) user.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA certificate (PEM file) clients must trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// A cluster-admin client. Call it inside the runtime that will use the client.
    pub async fn client(&self) -> Result<kube::Client, EnvError> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Writes a kubeconfig authenticating as `user` in `groups` with a client certificate
    /// signed by the cluster CA. RBAC then applies to that user (no bindings = no rights).
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf, EnvError> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let safe: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(60)
            .collect();
        self.write_kubeconfig(&format!("user-{safe}-{n}"), user, groups)
    }

    /// A client acting as `user` in `groups` (see [`KubeApi::user_kubeconfig`]).
    pub async fn client_for_user(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<kube::Client, EnvError> {
        client_from_kubeconfig(&self.user_kubeconfig(user, groups)?).await
    }

    /// A client authenticated as ServiceAccount `namespace/name`: user
    /// `system:serviceaccount:NS:NAME` in groups `system:serviceaccounts` and
    /// `system:serviceaccounts:NS`, so RoleBindings to the ServiceAccount apply.
    pub async fn client_for_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client, EnvError> {
        client_from_kubeconfig(&self.service_account_kubeconfig(namespace, name)?).await
    }

    /// The kubeconfig behind [`KubeApi::client_for_service_account`] (for helm, kubectl...).
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, EnvError> {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let ns_group = format!("system:serviceaccounts:{namespace}");
        self.user_kubeconfig(
            &user,
            &[
                "system:serviceaccounts",
                ns_group.as_str(),
                "system:authenticated",
            ],
        )
    }

    /// The temp dir holding certificates, etcd data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether kube-controller-manager runs.
    pub fn has_controller_manager(&self) -> bool {
        self.kcm.is_some()
    }

    fn write_kubeconfig(
        &self,
        file: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<PathBuf, EnvError> {
        let pki = self.dir.path().join("pki");
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        for g in groups {
            dn.push(DnType::OrganizationName, *g);
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca.issuer())?;
        let crt = pki.join(format!("{file}.crt"));
        let key_path = pki.join(format!("{file}.key"));
        write(&crt, &cert.pem())?;
        write(&key_path, &key.serialize_pem())?;
        // JSON is valid YAML, and every kubeconfig reader accepts it.
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "talaria-test", "cluster": {
                "server": self.server_url(),
                "certificate-authority": pki.join("ca.crt"),
            }}],
            "users": [{ "name": user, "user": {
                "client-certificate": crt,
                "client-key": key_path,
            }}],
            "contexts": [{ "name": "talaria-test", "context": {
                "cluster": "talaria-test", "user": user, "namespace": "default",
            }}],
            "current-context": "talaria-test",
        });
        let path = self.dir.path().join(format!("{file}.kubeconfig"));
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| EnvError::kube("encoding kubeconfig", e))?;
        write(&path, &text)?;
        Ok(path)
    }
}

fn new_ca() -> Result<Ca, EnvError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "talaria-test-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    Ok(Ca { params, key })
}

fn write(path: &Path, text: &str) -> Result<(), EnvError> {
    std::fs::write(path, text).map_err(|e| EnvError::io(format!("writing {}", path.display()), e))
}

fn http_request(path: &'static str) -> ::http::Request<Vec<u8>> {
    let mut req = ::http::Request::new(Vec::new());
    *req.uri_mut() = ::http::Uri::from_static(path);
    req
}

/// A client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, EnvError> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| EnvError::kube(format!("reading {}", path.display()), e))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| EnvError::kube(format!("loading {}", path.display()), e))?;
    kube::Client::try_from(config).map_err(|e| EnvError::kube("building a kube client", e))
}
