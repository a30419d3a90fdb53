//! The deployment files under deploy/ agree with the relay and with each other: every config
//! they carry validates, the command lines they run are accepted by the real binary, ports,
//! probes, mounts and paths line up between files, and the systemd unit passes
//! `systemd-analyze verify` (scripts/test installs systemd, so this runs in CI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use oauth_relay::Config;
use oauth_relay::config::{AcmeChallenge, TlsSource};
use serde::Deserialize;
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-relay");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file (a file may hold several, separated by `---`).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The value at a dotted path; `Null` when any step is missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or_else(|| panic!("`{path}` is not a string in {v:?}"))
}

fn list<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn validated(name: &str, toml: &str) -> Config {
    let c = Config::parse(name, toml).unwrap_or_else(|e| panic!("{name} does not validate:\n{e}"));
    assert!(c.warnings.is_empty(), "{name} has warnings: {:?}", c.warnings);
    c
}

/// Runs the binary with `args` as a deployment file writes them, the `--config` file replaced
/// by one with an unknown key: exit status 64 proves the arguments parsed and the config was
/// read from the path given (clap's usage errors exit 2).
fn assert_cli_accepts(what: &str, args: &[String]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("config.toml");
    std::fs::write(&bad, "[server]\nnot_a_key = 1\n").expect("write");
    let mut args = args.to_vec();
    let ix = args.iter().position(|a| a == "--config").unwrap_or_else(|| panic!("{what}: no --config in {args:?}"));
    args[ix + 1] = bad.display().to_string();
    let out = Command::new(BIN).args(&args).output().expect("run oauth-relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{what}: `oauth-relay {}` said:\n{stderr}", args.join(" "));
    assert!(stderr.contains("not_a_key"), "{what}: {stderr}");
}

fn config_flag(args: &[String]) -> &str {
    let ix = args.iter().position(|a| a == "--config").expect("--config");
    &args[ix + 1]
}

/// One Kubernetes variant: every manifest of one folder (not its subfolders), by kind.
struct Manifests {
    dir: String,
    docs: Vec<Value>,
}

impl Manifests {
    fn load(rel: &str) -> Manifests {
        let mut docs = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for f in &files {
            for d in yaml_docs(f) {
                for key in ["apiVersion", "kind", "metadata.name"] {
                    assert!(at(&d, key).as_str().is_some_and(|s| !s.is_empty()), "{}: no {key}", f.display());
                }
                docs.push(d);
            }
        }
        Manifests { dir: rel.to_string(), docs }
    }

    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self.docs.iter().filter(|d| text(d, "kind") == kind).collect();
        assert_eq!(found.len(), 1, "{}: expected exactly one {kind}", self.dir);
        found[0]
    }

    fn has(&self, kind: &str) -> bool {
        self.docs.iter().any(|d| text(d, "kind") == kind)
    }
}

/// The container port a probe or Service names, by port name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    let ports = list(container, "ports");
    let found = match port {
        Value::String(name) => ports.iter().find(|p| p["name"].as_str() == Some(name)),
        Value::Number(n) => ports.iter().find(|p| p["containerPort"].as_u64() == n.as_u64()),
        _ => None,
    };
    let p = found.unwrap_or_else(|| panic!("port {port:?} is not a container port"));
    p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()).expect("containerPort")
}

/// The volume mount that holds `path` (the deepest mount at or above it) and its volume.
fn mount_of<'a>(pod: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let mount = list(container, "volumeMounts")
        .iter()
        .filter(|m| {
            let mp = text(m, "mountPath");
            path == mp || path.strip_prefix(mp).is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|m| text(m, "mountPath").len())
        .unwrap_or_else(|| panic!("nothing is mounted at {path}"));
    let name = text(mount, "name");
    let volume = list(pod, "volumes").iter().find(|v| v["name"].as_str() == Some(name)).expect("volume");
    (mount, volume)
}

/// What every Kubernetes variant must get right; returns the parsed config and the Deployment.
fn check_kubernetes(m: &Manifests) -> (Config, &Value) {
    let deploy = m.one("Deployment");
    let pod = at(deploy, "spec.template.spec");
    let containers = list(pod, "containers");
    assert_eq!(containers.len(), 1, "{}: one container", m.dir);
    let c = &containers[0];

    // The config comes from the ConfigMap, at the path the arguments name.
    let args: Vec<String> = list(c, "args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    assert_cli_accepts(&format!("{} Deployment args", m.dir), &args);
    let (mount, volume) = mount_of(pod, c, config_flag(&args));
    assert_eq!(text(mount, "mountPath"), config_flag(&args), "{}: config mounted as a file", m.dir);
    let cm = m.one("ConfigMap");
    assert_eq!(text(volume, "configMap.name"), text(cm, "metadata.name"));
    let key = text(mount, "subPath");
    let toml = cm["data"][key].as_str().unwrap_or_else(|| panic!("{}: ConfigMap has no {key}", m.dir));
    let (_secrets, toml) = with_secret_files(m, pod, c, toml);
    let config = validated(&format!("{}/configmap.yaml {key}", m.dir), &toml);
    let server = &config.server;

    // Listeners line up with the container ports, and the Service maps 443/80 to them.
    let port_of = |name: &str| container_port(c, &Value::String(name.into()));
    assert_eq!(server.https.iter().map(|a| a.port()).collect::<Vec<_>>(), [port_of("https")]);
    assert_eq!(server.http.iter().map(|a| a.port()).collect::<Vec<_>>(), [port_of("http")]);
    assert_eq!(server.admin.map(|a| a.port()), Some(port_of("admin")));
    assert!(server.https.iter().chain(&server.http).all(|a| a.port() >= 1024), "no capability needed in the pod");
    assert_eq!(server.public_https_port, 443, "redirects and redirect URIs must name the Service's port");
    check_service(m, c, &config);

    // Probes: liveness and readiness on the admin listener, which speaks plain HTTP.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(c, &format!("{probe}.httpGet"));
        assert_eq!(text(get, "path"), path, "{}: {probe}", m.dir);
        assert_eq!(container_port(c, &get["port"]), port_of("admin"), "{}: {probe} port", m.dir);
        assert_eq!(get["scheme"].as_str().unwrap_or("HTTP"), "HTTP", "{}: the admin listener is plain", m.dir);
    }
    check_security(m, pod, c);

    for site in &config.sites {
        match &site.tls {
            // Certificate files come from a Secret mounted as a folder (a subPath mount never
            // sees a renewal).
            TlsSource::Files { cert, key, .. } => {
                for file in [cert, key] {
                    let (mount, volume) = mount_of(pod, c, &file.display().to_string());
                    assert!(mount["subPath"].is_null(), "{}: {} would never see a renewal", m.dir, file.display());
                    assert_eq!(text(volume, "secret.secretName"), "oauth-relay-tls");
                }
            }
            // The CA must reach the challenge's listener through the Service's public port.
            TlsSource::Acme(acme) => match acme.challenge {
                AcmeChallenge::TlsAlpn01 => assert_eq!(server.public_https_port, 443),
                AcmeChallenge::Http01 => assert!(!server.http.is_empty(), "{}: http-01 needs port 80", m.dir),
            },
            TlsSource::SelfSigned => panic!("{}: site {}: self-signed is for local use", m.dir, site.name),
        }
    }
    // The store is a writable volume (the root filesystem is read-only).
    let (mount, _) = mount_of(pod, c, &server.storage.display().to_string());
    assert_eq!(text(mount, "mountPath"), server.storage.display().to_string());
    assert_ne!(mount["readOnly"].as_bool(), Some(true));
    (config, deploy)
}

fn check_service(m: &Manifests, c: &Value, config: &Config) {
    let svc = m.one("Service");
    assert_eq!(text(svc, "spec.type"), "LoadBalancer");
    let labels = at(m.one("Deployment"), "spec.template.metadata.labels");
    for (k, v) in at(svc, "spec.selector").as_mapping().expect("selector") {
        assert_eq!(&labels[k.as_str().expect("label")], v, "{}: Service selector", m.dir);
    }
    let mut map = BTreeMap::new();
    for p in list(svc, "spec.ports") {
        map.insert(p["port"].as_u64().expect("port"), container_port(c, &p["targetPort"]));
    }
    let https = config.server.https[0].port();
    let http = config.server.http[0].port();
    assert_eq!(map, BTreeMap::from([(443, https), (80, http)]), "{}: Service ports (admin stays private)", m.dir);
}

fn check_security(m: &Manifests, pod: &Value, c: &Value) {
    assert_eq!(at(pod, "securityContext.runAsNonRoot").as_bool(), Some(true), "{}: runAsNonRoot", m.dir);
    assert_ne!(at(pod, "securityContext.runAsUser").as_u64(), Some(0));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{}: readOnlyRootFilesystem", m.dir);
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{}: allowPrivilegeEscalation", m.dir);
    assert_eq!(list(sc, "capabilities.drop"), [Value::String("ALL".into())]);
    assert!(list(sc, "capabilities.add").is_empty(), "{}: no capability is needed on 8443/8080", m.dir);
    for r in ["cpu", "memory"] {
        assert!(at(c, &format!("resources.requests.{r}")).as_str().is_some(), "{}: {r} request", m.dir);
    }
    let pdb = m.one("PodDisruptionBudget");
    assert_eq!(at(pdb, "spec.selector.matchLabels"), at(m.one("Deployment"), "spec.selector.matchLabels"));
}

#[test]
fn kubernetes_manifests_agree_with_the_relay() {
    let m = Manifests::load("deploy/kubernetes");
    let (config, deploy) = check_kubernetes(&m);
    let pod = at(deploy, "spec.template.spec");
    let (_, store) = mount_of(pod, &list(pod, "containers")[0], &config.server.storage.display().to_string());
    let pvc = m.one("PersistentVolumeClaim");
    assert_eq!(text(store, "persistentVolumeClaim.claimName"), text(pvc, "metadata.name"), "store on the PVC");
    // A ReadWriteOnce volume: one pod, and the old one gone before the new one mounts it.
    assert_eq!(list(pvc, "spec.accessModes"), [Value::String("ReadWriteOnce".into())]);
    assert_eq!(at(deploy, "spec.replicas").as_u64(), Some(1));
    assert_eq!(text(deploy, "spec.strategy.type"), "Recreate");
    // With one replica, a PDB that keeps a pod up would block every node drain.
    assert_eq!(at(m.one("PodDisruptionBudget"), "spec.maxUnavailable").as_u64(), Some(1));
    assert!(!m.has("Certificate"));
    assert!(matches!(config.sites[0].tls, TlsSource::Acme(_)), "the store holds the relay's own certificates");
}

#[test]
fn cert_manager_variant_mounts_the_certificate_secret() {
    let m = Manifests::load("deploy/kubernetes/cert-manager");
    let (config, deploy) = check_kubernetes(&m);
    let cert = m.one("Certificate");
    assert_eq!(text(cert, "apiVersion"), "cert-manager.io/v1");
    assert_eq!(text(cert, "spec.secretName"), "oauth-relay-tls", "the Secret the Deployment mounts");
    let names: Vec<&str> = list(cert, "spec.dnsNames").iter().map(|v| v.as_str().expect("name")).collect();
    assert_eq!(names, config.sites[0].hostnames, "the certificate covers exactly the site's hostnames");
    assert!(at(cert, "spec.issuerRef.name").as_str().is_some());
    // Stateless: two replicas, one kept serving.
    assert!(!m.has("PersistentVolumeClaim"));
    assert_eq!(at(deploy, "spec.replicas").as_u64(), Some(2));
    assert_eq!(at(m.one("PodDisruptionBudget"), "spec.minAvailable").as_u64(), Some(1));
}

/// A folder with a test value in each secret file `names` names, mode 0440 as a Secret mounted
/// for an fsGroup: a 32-byte base64 key for a `.key` file, a password otherwise.
fn secret_files(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in names {
        let value = if name.ends_with(".key") { format!("{}=\n", "Q".repeat(43)) } else { "test-password\n".into() };
        let file = dir.path().join(name);
        std::fs::write(&file, value).expect("write a secret file");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o440)).expect("chmod");
    }
    dir
}

/// The config of a variant that mounts its own Secret as files: those exist only in the pod, so they
/// are written to a folder with test values (the manifest's are placeholders), and the config
/// is read with that folder in place of the mount. Every file the config names under the mount
/// must be a key of the Secret.
fn with_secret_files(m: &Manifests, pod: &Value, c: &Value, toml: &str) -> (Option<tempfile::TempDir>, String) {
    if !m.has("Secret") {
        // A Secret made elsewhere (cert-manager's): the variant's own checks cover it.
        return (None, toml.to_string());
    }
    let Some(mount) = list(c, "volumeMounts").iter().find(|v| {
        let name = v["name"].as_str();
        list(pod, "volumes").iter().any(|vol| vol["name"].as_str() == name && !vol["secret"].is_null())
    }) else {
        return (None, toml.to_string());
    };
    let path = text(mount, "mountPath");
    let secret = m.one("Secret");
    let keys: Vec<&str> =
        at(secret, "stringData").as_mapping().expect("stringData").keys().map(|k| k.as_str().expect("key")).collect();
    let dir = secret_files(&keys);
    for named in toml.split('"').filter(|t| t.starts_with(&format!("{path}/"))) {
        let file = &named[path.len() + 1..];
        assert!(
            keys.contains(&file),
            "{}: the config names {named}, which Secret {} has no key for",
            m.dir,
            text(secret, "metadata.name")
        );
    }
    let replaced = toml.replace(&format!("{path}/"), &format!("{}/", dir.path().display()));
    (Some(dir), replaced)
}

#[test]
fn replicas_variant_shares_one_store_on_redis() {
    let m = Manifests::load("deploy/kubernetes/replicas");
    let (config, deploy) = check_kubernetes(&m);
    let shared = config.server.shared.as_ref().expect("the store is Redis");
    assert_eq!(shared.url.scheme(), "rediss", "over TLS");
    assert!(shared.password.is_some() && config.server.storage_key_file.is_some(), "a password, keys sealed");
    // Three pods that roll one at a time, two always up, spread over zones and nodes.
    assert_eq!(at(deploy, "spec.replicas").as_u64(), Some(3));
    assert_eq!(text(deploy, "spec.strategy.type"), "RollingUpdate");
    assert_eq!(at(deploy, "spec.strategy.rollingUpdate.maxUnavailable").as_u64(), Some(0));
    assert_eq!(at(m.one("PodDisruptionBudget"), "spec.minAvailable").as_u64(), Some(2));
    let spread: Vec<&str> = list(at(deploy, "spec.template.spec"), "topologySpreadConstraints")
        .iter()
        .map(|t| text(t, "topologyKey"))
        .collect();
    assert_eq!(spread, ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]);
    // No volume of its own beyond the cache: the store is Redis.
    assert!(!m.has("PersistentVolumeClaim"));
    let pod = at(deploy, "spec.template.spec");
    let (_, cache) = mount_of(pod, &list(pod, "containers")[0], &config.server.storage.display().to_string());
    assert!(!cache["emptyDir"].is_null(), "the cache is the pod's own");
    assert!(matches!(config.sites[0].tls, TlsSource::Acme(_)), "one ACME order shared by all replicas");

    // The example Redis keeps what it is given, and the relay's ACL user matches the config.
    let redis = Manifests::load("deploy/kubernetes/replicas/redis");
    let set = redis.one("StatefulSet");
    let args: Vec<&str> = list(&list(at(set, "spec.template.spec"), "containers")[0], "args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let arg = |flag: &str| args.iter().position(|a| *a == flag).map(|i| args[i + 1]);
    assert_eq!(arg("--appendonly"), Some("yes"));
    assert_eq!(arg("--maxmemory-policy"), Some("noeviction"));
    let user = shared.username.as_deref().expect("an ACL user");
    assert!(args.iter().any(|a| a.starts_with(&format!("{user} on ")) && a.contains(&format!("~{}:*", shared.prefix))));
}

/// The virtual environment `scripts/test` makes under the target folder for PyPI tools.
fn test_venv() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target folder").join("test-venv")
}

#[test]
fn every_kubernetes_manifest_validates_against_the_api_schemas() {
    let mut files: Vec<String> = Vec::new();
    let mut dirs = vec![repo().join("deploy/kubernetes")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a manifest folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path.display().to_string());
            }
        }
    }
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    let tool = test_venv().join("bin/kubernetes-validate");
    let out = Command::new(&tool)
        .args(["--strict", "--quiet", "--kubernetes-version", "1.31"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs kubernetes-validate)", tool.display()));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    // Custom resources have no bundled schema; everything else was checked.
    let unchecked: Vec<&str> =
        said.lines().filter(|l| !l.contains("Couldn't find schema for kind Certificate")).collect();
    assert!(unchecked.is_empty(), "{said}");
}

/// `Key=Value` lines of a unit file, in order, without sections or comments.
fn unit_entries(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn systemd_unit_and_config_agree() {
    let unit = read("deploy/systemd/oauth-relay.service");
    let entries = unit_entries(&unit);
    let get = |k: &str| entries.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let exec: Vec<String> = get("ExecStart").expect("ExecStart").split_whitespace().map(String::from).collect();
    assert_eq!(exec[0], "/usr/bin/oauth-relay", "where the Debian package installs it");
    assert_cli_accepts("systemd ExecStart", &exec[1..]);
    assert_eq!(config_flag(&exec), format!("/etc/{}/config.toml", get("ConfigurationDirectory").expect("conf dir")));

    let config = validated("deploy/systemd/config.toml", &read("deploy/systemd/config.toml"));
    let state = format!("/var/lib/{}", get("StateDirectory").expect("StateDirectory"));
    assert_eq!(config.server.storage, Path::new(&state), "the store is the StateDirectory");
    assert_eq!(get("WorkingDirectory"), Some(state.as_str()));
    let user = get("User").expect("User");
    assert!(read("deploy/systemd/oauth-relay.sysusers").contains(&format!("\nu {user} ")), "sysusers creates {user}");
    for (key, value) in [
        ("Type", "notify"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("LimitNOFILE", "65536"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(get(key), Some(value), "{key}");
    }
    assert!(get("RestrictAddressFamilies").is_some_and(|v| v.contains("AF_INET6")));
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("skipped: systemd-analyze is not installed (scripts/test installs it)");
        return;
    }
    // verify needs ExecStart's binary to exist: point a copy of the unit at the one just built.
    let unit = read("deploy/systemd/oauth-relay.service");
    let patched = unit.replace("ExecStart=/usr/bin/oauth-relay ", &format!("ExecStart={BIN} "));
    assert_ne!(patched, unit, "ExecStart was rewritten");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oauth-relay.service");
    std::fs::write(&path, patched).expect("write unit");

    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");

    // The hardening holds: exposure at most 2.0 of 10 (the scale of --threshold is 0..100).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze security:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// The JSON-array form of a Dockerfile instruction (`CMD ["a", "b"]`).
fn dockerfile_array(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(instruction).filter(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("Dockerfile has no {instruction}"));
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{instruction} is not a JSON array: {e}"))
}

#[test]
fn container_files_agree_with_the_relay() {
    let dockerfile = read("deploy/container/Dockerfile");
    let compose = &yaml_docs(&repo().join("deploy/container/compose.yaml"))[0];
    let svc = at(compose, "services.oauth-relay");
    let config = validated("deploy/container/config.toml", &read("deploy/container/config.toml"));

    let cmd = dockerfile_array(&dockerfile, "CMD");
    let compose_cmd: Vec<String> = list(svc, "command").iter().map(|v| v.as_str().expect("arg").into()).collect();
    assert_eq!(compose_cmd, cmd, "compose runs the image's command");
    assert_cli_accepts("Dockerfile CMD", &cmd);
    assert_eq!(dockerfile_array(&dockerfile, "ENTRYPOINT"), ["/usr/local/bin/oauth-relay"]);
    assert!(dockerfile.contains("/out/usr/local/bin/oauth-relay /usr/local/bin/oauth-relay"));
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot") && dockerfile.contains("USER 65532"));
    // The build stage installs the binary, executable, where the runtime stage copies it from.
    // How it is built (plain release, profile-optimised) is the build's business, not this test's.
    let installed =
        dockerfile.lines().any(|l| l.contains("install -D -m 0755 ") && l.contains(" /out/usr/local/bin/oauth-relay"));
    assert!(installed, "the build stage installs /out/usr/local/bin/oauth-relay:\n{dockerfile}");

    // Mounts: the config where CMD reads it, the TLS files, and the store where VOLUME is.
    let mounts = short_mounts(svc);
    assert_eq!(mounts.get(config_flag(&cmd)).map(String::as_str), Some("./config.toml"));
    let storage = config.server.storage.display().to_string();
    assert_eq!(dockerfile_array(&dockerfile, "VOLUME"), std::slice::from_ref(&storage));
    assert!(mounts.contains_key(&storage), "the store is on a volume");
    for site in &config.sites {
        if let TlsSource::Files { cert, key, .. } = &site.tls {
            for f in [cert, key] {
                assert!(mounts.keys().any(|m| f.starts_with(m)), "{} is mounted", f.display());
            }
        }
    }

    // Ports: every listener is exposed and published; 443/80 as uid 65532 need the sysctl.
    let ports: Vec<u16> = config.server.https.iter().chain(&config.server.http).map(|a| a.port()).collect();
    let admin = config.server.admin.expect("admin listener").port();
    let expose = dockerfile.lines().find_map(|l| l.strip_prefix("EXPOSE ")).expect("EXPOSE");
    let published: Vec<&str> = list(svc, "ports").iter().map(|p| p.as_str().expect("port")).collect();
    for p in ports.iter().chain([&admin]) {
        assert!(expose.split_whitespace().any(|e| e == p.to_string()), "EXPOSE {p}");
        assert!(published.iter().any(|s| s.ends_with(&format!(":{p}"))), "compose publishes {p}");
    }
    assert!(published.contains(&format!("127.0.0.1:{admin}:{admin}").as_str()), "admin only on loopback");
    assert_eq!(at(svc, "sysctls")["net.ipv4.ip_unprivileged_port_start"].as_u64(), Some(0));
}

/// A compose service's volumes in the short syntax: container path to source.
fn short_mounts(svc: &Value) -> BTreeMap<String, String> {
    list(svc, "volumes")
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.as_str().expect("short volume syntax").split(':').collect();
            (parts[1].to_string(), parts[0].to_string())
        })
        .collect()
}

#[test]
fn container_files_with_redis_agree_with_the_relay() {
    let dockerfile = read("deploy/container/Dockerfile");
    let compose = &yaml_docs(&repo().join("deploy/container/compose-redis.yaml"))[0];
    let svc = at(compose, "services.oauth-relay");
    let cmd: Vec<String> = list(svc, "command").iter().map(|v| v.as_str().expect("arg").into()).collect();
    assert_eq!(cmd, dockerfile_array(&dockerfile, "CMD"), "compose runs the image's command");
    let mounts = short_mounts(svc);
    assert_eq!(mounts.get(config_flag(&cmd)).map(String::as_str), Some("./config-redis.toml"));
    assert_eq!(mounts.get("/etc/oauth-relay/secrets").map(String::as_str), Some("./secrets"));

    // The config validates once the secrets exist (test values in a folder of their own).
    let secrets = secret_files(&["redis-password", "storage.key"]);
    let toml = read("deploy/container/config-redis.toml")
        .replace("/etc/oauth-relay/secrets/", &format!("{}/", secrets.path().display()));
    let config = Config::parse("deploy/container/config-redis.toml", &toml).expect("validates");
    let shared = config.server.shared.as_ref().expect("a Redis store");
    assert_eq!(shared.url.host_str(), Some("redis"), "the compose service");
    assert!(shared.password.is_some() && config.server.storage_key_file.is_some());
    assert!(mounts.contains_key(&config.server.storage.display().to_string()), "the cache is on a volume");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert!(warnings.is_empty(), "{warnings:?}");

    // The example Redis keeps what it is given.
    let redis: Vec<&str> = list(at(compose, "services.redis"), "command").iter().map(|v| v.as_str().unwrap()).collect();
    let line = redis.last().expect("a command");
    assert!(line.contains("--appendonly yes") && line.contains("--maxmemory-policy noeviction"), "{line}");
}
