//! The deployment files under deploy/, checked without a cluster, helm or docker: every
//! manifest parses; the kustomize bundle is built by `kubectl kustomize`; the Helm chart is
//! rendered by Go's text/template with Helm's function library (tests/helm-render, built
//! with Debian's Go, as no registry here ships helm); and the DaemonSet
//! from both has what the agent needs (hostNetwork, the host's bpffs/tracefs/cgroup2, the
//! capabilities, probes on the metrics port, a rolling update without surge) and command
//! lines the real `circuit-agent attach` accepts. The Dockerfile is read as text.
//!
//! Needs the agent binary (`circuit_tests::agent_binary`) for the CLI checks; no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Deserialize;
use serde_norway::{Mapping, Value};

const METRICS_PORT: u16 = 9464;
const CONFIG_PATH: &str = "/etc/circuit/circuit.toml";
/// Where the agent puts its control socket (daemon::default_socket): writable, since the
/// root filesystem is read-only.
const RUN_DIR: &str = "/run/circuit";
/// The capabilities the agent gets, no more: see deploy/kubernetes/daemonset.yaml.
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
/// hostPath mounts: path (the same on the host and in the container), mountPropagation,
/// read-only.
const HOST_MOUNTS: [(&str, Option<&str>, bool); 3] = [
    ("/sys/fs/bpf", Some("HostToContainer"), false),
    ("/sys/kernel/tracing", None, true),
    ("/sys/fs/cgroup", None, true),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The default config every deployment ships.
fn shipped_config() -> Result<String> {
    read(&deploy_dir().join("config/circuit.toml"))
}

/// Every YAML document in `text` (empty documents skipped).
fn yaml_documents(what: &str, text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .with_context(|| format!("{what}: YAML document {i} does not parse"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn yaml_file(path: &Path) -> Result<Value> {
    let text = read(path)?;
    let mut docs = yaml_documents(&path.display().to_string(), &text)?;
    ensure!(docs.len() == 1, "{}: expected one document", path.display());
    Ok(docs.remove(0))
}

// ---------------------------------------------------------------------------------------
// Navigating parsed YAML

fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value> {
    get(value, path).ok_or_else(|| anyhow!("missing {}", path.join(".")))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a str> {
    at(value, path)?
        .as_str()
        .ok_or_else(|| anyhow!("{} is not a string", path.join(".")))
}

fn seq_at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Vec<Value>> {
    at(value, path)?
        .as_sequence()
        .ok_or_else(|| anyhow!("{} is not a list", path.join(".")))
}

fn is_true(value: &Value, path: &[&str]) -> bool {
    get(value, path).and_then(Value::as_bool) == Some(true)
}

fn kind(object: &Value) -> &str {
    object.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name(object: &Value) -> &str {
    get(object, &["metadata", "name"])
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn only<'a>(objects: &'a [Value], wanted: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = objects.iter().filter(|o| kind(o) == wanted).collect();
    ensure!(
        found.len() == 1,
        "expected one {wanted}, found {}",
        found.len()
    );
    Ok(found[0])
}

/// Every object is a well-formed Kubernetes object, and no two share kind, namespace and name.
fn check_objects(objects: &[Value]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for object in objects {
        let kind = kind(object);
        ensure!(!kind.is_empty(), "an object without kind: {object:?}");
        str_at(object, &["apiVersion"]).with_context(|| kind.to_owned())?;
        let name = name(object);
        ensure!(!name.is_empty(), "a {kind} without metadata.name");
        let namespace = get(object, &["metadata", "namespace"])
            .and_then(Value::as_str)
            .unwrap_or("");
        ensure!(
            seen.insert((kind.to_owned(), namespace.to_owned(), name.to_owned())),
            "{kind} {namespace}/{name} appears twice"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// kustomize, the part these manifests use

/// Kustomization fields this emulation implements; anything else fails the test rather than
/// being silently ignored.
/// What `kubectl kustomize dir` (kustomize built into kubectl) produces: the bundle as a
/// cluster would receive it, generated ConfigMap names with their content hash included.
fn kustomize_build(dir: &Path) -> Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("kubectl (its built-in kustomize renders deploy/kubernetes) cannot run")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents("kubectl kustomize", &String::from_utf8(out.stdout)?)
}

// ---------------------------------------------------------------------------------------
// Helm: Go's text/template with Sprig, as helm renders charts

/// The Go module tree Debian's packages install (`cargo xtask setup` installs them).
const GO_SOURCES: &str = "/usr/share/gocode";

/// `tests/helm-render` built with Debian's Go in GOPATH mode (no module download): Helm's
/// template engine and function library without helm, which no registry here ships.
fn helm_renderer() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_helm_renderer().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn build_helm_renderer() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-render");
    // Sprig v3 and its semver/v3 are imported by their module paths; in GOPATH mode those
    // are directories, which Debian's tree names without the /v3.
    let gopath = dir.join("gopath");
    for (link, target) in [
        (
            "github.com/Masterminds/sprig/v3",
            "github.com/Masterminds/sprig",
        ),
        (
            "github.com/Masterminds/semver/v3",
            "github.com/Masterminds/semver",
        ),
    ] {
        let link = gopath.join("src").join(link);
        fs::create_dir_all(link.parent().unwrap())?;
        match std::os::unix::fs::symlink(Path::new(GO_SOURCES).join("src").join(target), &link) {
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => return Err(err.into()),
            _ => {}
        }
    }
    // Built under a name of this process's, then renamed: test processes may race.
    let binary = dir.join("helm-render");
    let building = dir.join(format!("helm-render.{}", std::process::id()));
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&building)
        .arg(repo_root().join("tests/helm-render/main.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:{GO_SOURCES}", gopath.display()))
        .env("GOCACHE", dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .context("go (Debian's golang-go; `cargo xtask setup` installs it) cannot run")?;
    ensure!(
        out.status.success(),
        "building tests/helm-render failed (are golang-github-masterminds-sprig-dev and golang-gopkg-yaml.v3-dev installed? `cargo xtask setup`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::rename(&building, &binary)?;
    Ok(binary)
}

/// Renders `templates` with `root` (`.Values`, `.Chart`, `.Release`) as `helm template` does.
fn helm_render(templates: &[PathBuf], root: &Value) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(helm_renderer()?)
        .args(templates)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let data = serde_json::to_vec(root)?;
    child.stdin.take().expect("piped").write_all(&data)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Deep-merges `over` into `base` the way helm merges `--set`/`-f` values over values.yaml.
fn merge_values(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(existing) => merge_values(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/circuit")
}

fn chart_values() -> Result<Value> {
    yaml_file(&chart_dir().join("values.yaml"))
}

/// `helm template circuit deploy/helm/circuit --namespace circuit-system [-f overrides]`.
fn helm_template(overrides: Option<&str>) -> Result<Vec<Value>> {
    let dir = chart_dir();
    let chart = yaml_file(&dir.join("Chart.yaml"))?;
    let mut values = chart_values()?;
    if let Some(overrides) = overrides {
        merge_values(&mut values, &serde_norway::from_str(overrides)?);
    }
    // Helm's .Chart uses the Go field names of Chart.yaml's keys.
    let mut chart_object = Mapping::new();
    for (key, field) in [
        ("name", "Name"),
        ("version", "Version"),
        ("appVersion", "AppVersion"),
        ("description", "Description"),
        ("type", "Type"),
        ("apiVersion", "APIVersion"),
    ] {
        if let Some(value) = chart.get(key) {
            chart_object.insert(field.into(), value.clone());
        }
    }
    let mut root: Value = serde_norway::from_str(
        "Release: {Name: circuit, Namespace: circuit-system, Service: Helm}",
    )?;
    root["Values"] = values;
    root["Chart"] = Value::Mapping(chart_object);

    let mut templates: Vec<PathBuf> = fs::read_dir(dir.join("templates"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    templates.sort();
    for path in &templates {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        ensure!(
            file.ends_with(".yaml"),
            "templates/{file}: the test renders only .yaml templates"
        );
    }
    let rendered = helm_render(&templates, &root).context("rendering the chart")?;
    let objects = yaml_documents("rendered chart", &rendered)
        .with_context(|| format!("rendered chart:\n{rendered}"))?;
    Ok(objects)
}

// ---------------------------------------------------------------------------------------
// What the agent's DaemonSet must have, whichever way it is built

/// `--flag value` and `--flag=value` pairs after the verb.
fn flags(args: &[String]) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        ensure!(arg.starts_with("--"), "argument {arg:?} is not a --flag");
        match arg.split_once('=') {
            Some((flag, value)) => pairs.push((flag.to_owned(), value.to_owned())),
            None => {
                let value = rest.next().with_context(|| format!("{arg} has no value"))?;
                ensure!(!value.starts_with("--"), "{arg} has no value");
                pairs.push((arg.clone(), value.clone()));
            }
        }
    }
    Ok(pairs)
}

fn values_of<'a>(pairs: &'a [(String, String)], flag: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(f, _)| f == flag)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one_value<'a>(pairs: &'a [(String, String)], flag: &str) -> Result<&'a str> {
    match values_of(pairs, flag).as_slice() {
        [value] => Ok(value),
        other => bail!("expected {flag} once, found {other:?}"),
    }
}

fn agent_args(daemonset: &Value) -> Result<Vec<String>> {
    let container = &seq_at(daemonset, &["spec", "template", "spec", "containers"])?[0];
    seq_at(container, &["args"])?
        .iter()
        .map(|a| {
            a.as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("a non-string arg: {a:?}"))
        })
        .collect()
}

/// Checks the agent's DaemonSet in `objects` (a kustomize or Helm bundle); returns its args.
fn check_agent_daemonset(objects: &[Value]) -> Result<Vec<String>> {
    check_objects(objects)?;
    let ds = only(objects, "DaemonSet")?;
    ensure!(str_at(ds, &["apiVersion"])? == "apps/v1");
    let namespace = str_at(ds, &["metadata", "namespace"])?;

    // One node at a time, never two agents on a node.
    let strategy = at(ds, &["spec", "updateStrategy"])?;
    ensure!(
        str_at(strategy, &["type"])? == "RollingUpdate",
        "{strategy:?}"
    );
    ensure!(at(strategy, &["rollingUpdate", "maxUnavailable"])?.as_u64() == Some(1));
    ensure!(at(strategy, &["rollingUpdate", "maxSurge"])?.as_u64() == Some(0));

    let selector = at(ds, &["spec", "selector", "matchLabels"])?
        .as_mapping()
        .context("matchLabels")?;
    let labels = at(ds, &["spec", "template", "metadata", "labels"])?
        .as_mapping()
        .context("template labels")?;
    ensure!(!selector.is_empty());
    for (key, value) in selector {
        ensure!(
            labels.get(key) == Some(value),
            "the pod template lacks selector label {key:?}"
        );
    }

    let annotations = at(ds, &["spec", "template", "metadata", "annotations"])?;
    ensure!(str_at(annotations, &["prometheus.io/scrape"])? == "true");
    ensure!(str_at(annotations, &["prometheus.io/port"])? == METRICS_PORT.to_string());
    ensure!(str_at(annotations, &["prometheus.io/path"])? == "/metrics");

    let pod = at(ds, &["spec", "template", "spec"])?;
    ensure!(is_true(pod, &["hostNetwork"]), "hostNetwork");
    ensure!(!is_true(pod, &["hostPID"]) && !is_true(pod, &["hostIPC"]));
    ensure!(
        get(pod, &["automountServiceAccountToken"]).and_then(Value::as_bool) == Some(false),
        "the pod must not mount an API token"
    );
    ensure!(str_at(pod, &["priorityClassName"])? == "system-node-critical");
    ensure!(at(pod, &["terminationGracePeriodSeconds"])?.as_u64() == Some(30));
    ensure!(str_at(pod, &["nodeSelector", "kubernetes.io/os"])? == "linux");
    let tolerations = seq_at(pod, &["tolerations"])?;
    ensure!(
        tolerations.iter().any(|t| {
            t.get("operator").and_then(Value::as_str) == Some("Exists")
                && t.get("key").is_none()
                && t.get("effect").is_none()
        }),
        "a toleration of every taint (operator Exists, no key, no effect): {tolerations:?}"
    );

    // The ServiceAccount exists, in the same namespace, without a token either.
    let account_name = str_at(pod, &["serviceAccountName"])?;
    let account = objects
        .iter()
        .find(|o| kind(o) == "ServiceAccount" && name(o) == account_name)
        .with_context(|| format!("no ServiceAccount {account_name}"))?;
    ensure!(str_at(account, &["metadata", "namespace"])? == namespace);
    ensure!(at(account, &["automountServiceAccountToken"])?.as_bool() == Some(false));
    ensure!(
        !objects.iter().any(|o| kind(o).contains("Role")),
        "the agent needs no RBAC"
    );

    let containers = seq_at(pod, &["containers"])?;
    ensure!(containers.len() == 1, "one container, the agent");
    let agent = &containers[0];
    ensure!(!str_at(agent, &["image"])?.is_empty());
    ensure!(
        agent.get("command").is_none(),
        "the image's ENTRYPOINT (circuit-agent) must run; args carry the verb"
    );

    // Capabilities: exactly these, not privileged, hardened where compatible.
    let security = at(agent, &["securityContext"])?;
    ensure!(!is_true(security, &["privileged"]), "privileged is not set");
    ensure!(
        get(pod, &["securityContext", "privileged"]).is_none(),
        "no pod-level privileged"
    );
    let added: BTreeSet<&str> = seq_at(security, &["capabilities", "add"])?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        added == CAPABILITIES.into_iter().collect(),
        "capabilities {added:?}, expected {CAPABILITIES:?}"
    );
    let dropped: Vec<&str> = seq_at(security, &["capabilities", "drop"])?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(dropped == ["ALL"], "drop {dropped:?}");
    ensure!(at(security, &["runAsUser"])?.as_u64() == Some(0));
    ensure!(at(security, &["allowPrivilegeEscalation"])?.as_bool() == Some(false));
    ensure!(at(security, &["readOnlyRootFilesystem"])?.as_bool() == Some(true));
    ensure!(str_at(security, &["seccompProfile", "type"])? == "Unconfined");
    ensure!(str_at(security, &["appArmorProfile", "type"])? == "Unconfined");

    // Volumes and mounts.
    let volumes: BTreeMap<&str, &Value> = seq_at(pod, &["volumes"])?
        .iter()
        .map(|v| Ok((str_at(v, &["name"])?, v)))
        .collect::<Result<_>>()?;
    let mut host_mounts = BTreeSet::new();
    let mut config_map = None;
    let mut run_dir = false;
    for mount in seq_at(agent, &["volumeMounts"])? {
        let volume_name = str_at(mount, &["name"])?;
        let volume = volumes
            .get(volume_name)
            .with_context(|| format!("mount of unknown volume {volume_name}"))?;
        let mount_path = str_at(mount, &["mountPath"])?;
        let propagation = get(mount, &["mountPropagation"]).and_then(Value::as_str);
        ensure!(
            propagation != Some("Bidirectional") || is_true(security, &["privileged"]),
            "{mount_path}: the API server admits Bidirectional propagation only for privileged containers"
        );
        let read_only = is_true(mount, &["readOnly"]);
        if let Some(host_path) = volume.get("hostPath") {
            let path = str_at(host_path, &["path"])?;
            let expected = HOST_MOUNTS
                .iter()
                .find(|(p, _, _)| *p == path)
                .with_context(|| format!("unexpected hostPath {path}"))?;
            ensure!(mount_path == path, "{path} mounted at {mount_path}");
            ensure!(
                str_at(host_path, &["type"])? == "Directory",
                "{path}: hostPath type"
            );
            ensure!(
                propagation == expected.1,
                "{path}: mountPropagation {propagation:?}, expected {:?}",
                expected.1
            );
            ensure!(read_only == expected.2, "{path}: readOnly {read_only}");
            ensure!(host_mounts.insert(path), "{path} mounted twice");
        } else if let Some(source) = volume.get("configMap") {
            ensure!(read_only, "{mount_path}: the config mount is read-only");
            ensure!(
                get(mount, &["subPath"]).is_none(),
                "{mount_path}: a subPath mount never sees ConfigMap updates"
            );
            config_map = Some((mount_path, str_at(source, &["name"])?));
        } else if volume.get("emptyDir").is_some() {
            ensure!(
                mount_path == RUN_DIR && !read_only,
                "{mount_path}: the only scratch space is a writable {RUN_DIR}"
            );
            run_dir = true;
        } else {
            bail!("{volume_name}: unexpected volume {volume:?}");
        }
    }
    let expected_mounts: BTreeSet<&str> = HOST_MOUNTS.iter().map(|m| m.0).collect();
    ensure!(
        host_mounts == expected_mounts,
        "host mounts {host_mounts:?}, expected {expected_mounts:?}"
    );
    ensure!(
        run_dir,
        "no writable {RUN_DIR}: with a read-only root the agent cannot create its control socket"
    );

    // The metrics port, the probes and the metrics address agree.
    let ports = seq_at(agent, &["ports"])?;
    let metrics = ports
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("metrics"))
        .context("no port named metrics")?;
    ensure!(at(metrics, &["containerPort"])?.as_u64() == Some(METRICS_PORT.into()));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let http = at(agent, &[probe, "httpGet"])?;
        ensure!(str_at(http, &["path"])? == path, "{probe} path");
        let port = at(http, &["port"])?;
        ensure!(
            port.as_str() == Some("metrics") || port.as_u64() == Some(METRICS_PORT.into()),
            "{probe} port {port:?}"
        );
    }

    // The command line.
    let args = agent_args(ds)?;
    ensure!(
        args.first().map(String::as_str) == Some("attach"),
        "{args:?}"
    );
    let pairs = flags(&args)?;
    ensure!(one_value(&pairs, "--config")? == CONFIG_PATH);
    let (config_dir, config_name) = config_map.context("no ConfigMap mount")?;
    ensure!(
        Path::new(CONFIG_PATH).parent() == Some(Path::new(config_dir)),
        "--config {CONFIG_PATH} is not in the ConfigMap mount {config_dir}"
    );
    let config = objects
        .iter()
        .find(|o| kind(o) == "ConfigMap" && name(o) == config_name)
        .with_context(|| format!("no ConfigMap {config_name}"))?;
    ensure!(str_at(config, &["metadata", "namespace"])? == namespace);
    let toml_key = Path::new(CONFIG_PATH)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    ensure!(
        str_at(config, &["data", toml_key])? == shipped_config()?,
        "the ConfigMap's {toml_key} is not deploy/config/circuit.toml"
    );
    let pin_dir = one_value(&pairs, "--pin-dir")?;
    ensure!(
        Path::new(pin_dir).starts_with("/sys/fs/bpf") && pin_dir != "/sys/fs/bpf",
        "--pin-dir {pin_dir} must be a directory on the mounted bpffs"
    );
    let metrics_addr: SocketAddr = one_value(&pairs, "--metrics-addr")?
        .parse()
        .context("--metrics-addr")?;
    ensure!(
        metrics_addr.ip().is_unspecified() && metrics_addr.port() == METRICS_PORT,
        "--metrics-addr {metrics_addr}: the kubelet probes the node IP on {METRICS_PORT}"
    );
    ensure!(
        values_of(&pairs, "--socket")
            .iter()
            .all(|s| Path::new(s).starts_with(RUN_DIR)),
        "--socket must be in the writable {RUN_DIR}"
    );
    for iface in values_of(&pairs, "--iface") {
        ensure!(!iface.is_empty(), "an empty --iface");
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------
// The agent binary

fn agent() -> Command {
    Command::new(circuit_tests::agent_binary().unwrap())
}

/// The `attach` flags the binary documents.
fn attach_help() -> String {
    let out = agent().args(["attach", "--help"]).output().unwrap();
    assert!(out.status.success(), "circuit-agent attach --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `help` mentions `flag` as a whole option name (not as a prefix of a longer one).
fn mentions_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let next = help[i + flag.len()..].chars().next();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// Every command line the deployments give `circuit-agent`, with where it comes from.
fn deployed_command_lines() -> Result<Vec<(String, Vec<String>)>> {
    let mut lines = vec![(
        "deploy/kubernetes".to_owned(),
        agent_args(only(
            &kustomize_build(&deploy_dir().join("kubernetes"))?,
            "DaemonSet",
        )?)?,
    )];
    for (what, overrides) in [
        ("helm (default values)", None),
        ("helm (interfaces and enforce set)", Some(HELM_OVERRIDES)),
    ] {
        let objects = helm_template(overrides)?;
        lines.push((what.to_owned(), agent_args(only(&objects, "DaemonSet")?)?));
    }
    let dockerfile = Dockerfile::read()?;
    lines.push((
        "deploy/Dockerfile CMD".to_owned(),
        dockerfile.exec_form("CMD")?,
    ));
    Ok(lines)
}

const HELM_OVERRIDES: &str = "
interfaces: [eth0, ens5]
enforce: [cgroup, tc]
xdpMode: generic
pinDir: /sys/fs/bpf/circuit-test
metrics: {port: 9464}
";

// ---------------------------------------------------------------------------------------
// Dockerfile

/// deploy/Dockerfile as the dockerfile-parser crate reads it (Docker's grammar:
/// continuations, comments, exec and shell forms, stages).
struct Dockerfile(dockerfile_parser::Dockerfile);

impl Dockerfile {
    fn read() -> Result<Dockerfile> {
        let text = read(&deploy_dir().join("Dockerfile"))?;
        dockerfile_parser::Dockerfile::parse(&text)
            .map(Dockerfile)
            .map_err(|err| anyhow!("deploy/Dockerfile does not parse: {err}"))
    }

    fn stages(&self) -> usize {
        self.0.stages().stages.len()
    }

    /// The stage's instructions named `keyword`, as text (continuations joined, runs of
    /// whitespace made one space), with `${ARG}`s replaced by their defaults as docker does:
    /// global ARGs (before the first FROM) in FROM lines, the stage's own ARGs (which may
    /// take a global's default by naming it) in the stage.
    fn in_stage(&self, stage: usize, keyword: &str) -> Vec<String> {
        use dockerfile_parser::{Instruction, ShellOrExecExpr};
        let value = |arg: &dockerfile_parser::ArgInstruction| {
            arg.value
                .as_ref()
                .map(|v| v.content.trim_matches('"').to_owned())
        };
        let global: BTreeMap<String, String> = self
            .0
            .global_args
            .iter()
            .filter_map(|arg| Some((arg.name.content.clone(), value(arg)?)))
            .collect();
        let substitute = |text: &str, args: &BTreeMap<String, String>| {
            let text = args.iter().fold(text.to_owned(), |text, (name, value)| {
                text.replace(&format!("${{{name}}}"), value)
            });
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        let stages = self.0.stages();
        let Some(stage) = stages.stages.get(stage) else {
            return Vec::new();
        };
        let mut local = BTreeMap::new();
        let mut found = Vec::new();
        for instruction in &stage.instructions {
            let text = match instruction {
                Instruction::Arg(arg) => {
                    let name = arg.name.content.clone();
                    if let Some(v) = value(arg).or_else(|| global.get(&name).cloned()) {
                        local.insert(name, v);
                    }
                    continue;
                }
                Instruction::From(from) if keyword == "FROM" => {
                    let alias = from.alias.as_ref().map(|a| format!(" AS {}", a.content));
                    found.push(substitute(
                        &format!("{}{}", from.image.content, alias.unwrap_or_default()),
                        &global,
                    ));
                    continue;
                }
                Instruction::Run(run) if keyword == "RUN" => match &run.expr {
                    ShellOrExecExpr::Shell(shell) => shell.to_string(),
                    ShellOrExecExpr::Exec(exec) => exec.as_str_vec().join(" "),
                },
                Instruction::Copy(copy) if keyword == "COPY" => {
                    let flags = copy
                        .flags
                        .iter()
                        .map(|f| format!("--{}={}", f.name.content, f.value.content));
                    let paths = copy
                        .sources
                        .iter()
                        .chain([&copy.destination])
                        .map(|p| p.content.clone());
                    flags.chain(paths).collect::<Vec<_>>().join(" ")
                }
                Instruction::Misc(misc)
                    if misc.instruction.content.eq_ignore_ascii_case(keyword) =>
                {
                    misc.arguments.to_string()
                }
                _ => continue,
            };
            found.push(substitute(&text, &local));
        }
        found
    }

    /// `ENTRYPOINT ["a", "b"]` / `CMD [...]` of the last stage, as a list.
    fn exec_form(&self, keyword: &str) -> Result<Vec<String>> {
        use dockerfile_parser::Instruction;
        let stages = self.0.stages();
        let last = stages.stages.last().context("no FROM")?;
        let exprs: Vec<_> = last
            .instructions
            .iter()
            .filter_map(|i| match i {
                Instruction::Entrypoint(e) if keyword == "ENTRYPOINT" => Some(&e.expr),
                Instruction::Cmd(c) if keyword == "CMD" => Some(&c.expr),
                _ => None,
            })
            .collect();
        match exprs.as_slice() {
            [expr] => Ok(expr
                .as_exec()
                .with_context(|| format!("{keyword} is not in exec (JSON) form"))?
                .as_str_vec()
                .into_iter()
                .map(str::to_owned)
                .collect()),
            other => bail!(
                "expected one {keyword} in the final stage, found {}",
                other.len()
            ),
        }
    }
}

/// toolchain.env's `KEY=VALUE` pairs: the toolchain versions, which xtask setup and the
/// Dockerfile both read.
fn toolchain() -> Result<BTreeMap<String, String>> {
    Ok(
        circuit_tests::toolchain_env(&read(&repo_root().join("toolchain.env"))?)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_manifest_parses_as_kubernetes_objects() -> Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    ensure!(files.len() >= 10, "found only {files:?}");
    for path in files {
        let text = read(&path)?;
        let relative = path.strip_prefix(deploy_dir())?;
        if relative.starts_with("helm/circuit/templates") {
            continue; // templates parse once rendered (below)
        }
        let docs = yaml_documents(&relative.display().to_string(), &text)?;
        ensure!(!docs.is_empty(), "{} is empty", relative.display());
        if relative.starts_with("kubernetes") && !relative.ends_with("kustomization.yaml") {
            check_objects(&docs).with_context(|| relative.display().to_string())?;
        }
    }
    Ok(())
}

#[test]
fn kustomize_bundle_has_namespace_account_config_and_daemonset() -> Result<()> {
    let objects = kustomize_build(&deploy_dir().join("kubernetes"))?;
    check_objects(&objects)?;
    let kinds: BTreeSet<&str> = objects.iter().map(kind).collect();
    ensure!(
        kinds == BTreeSet::from(["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"]),
        "{kinds:?}"
    );
    let namespace = only(&objects, "Namespace")?;
    ensure!(name(namespace) == "circuit-system");
    ensure!(
        str_at(
            namespace,
            &["metadata", "labels", "pod-security.kubernetes.io/enforce"]
        )? == "privileged",
        "the agent's pod is privileged-level for Pod Security Admission"
    );
    for object in objects.iter().filter(|o| kind(o) != "Namespace") {
        ensure!(str_at(object, &["metadata", "namespace"])? == "circuit-system");
    }
    // The generated ConfigMap holds deploy/config/circuit.toml, under its file name.
    let config = only(&objects, "ConfigMap")?;
    ensure!(str_at(config, &["data", "circuit.toml"])? == shipped_config()?);
    let image = str_at(&agent_container(only(&objects, "DaemonSet")?)?, &["image"])?.to_owned();
    ensure!(
        image == format!("circuit-agent:{}", env!("CARGO_PKG_VERSION")),
        "image {image}"
    );
    Ok(())
}

fn agent_container(daemonset: &Value) -> Result<Value> {
    Ok(seq_at(daemonset, &["spec", "template", "spec", "containers"])?[0].clone())
}

#[test]
fn kustomize_daemonset_has_what_the_agent_needs() -> Result<()> {
    let objects = kustomize_build(&deploy_dir().join("kubernetes"))?;
    let args = check_agent_daemonset(&objects)?;
    let pairs = flags(&args)?;
    ensure!(one_value(&pairs, "--pin-dir")? == "/sys/fs/bpf/circuit");
    ensure!(one_value(&pairs, "--metrics-addr")? == "0.0.0.0:9464");
    Ok(())
}

#[test]
fn helm_chart_renders_the_same_agent() -> Result<()> {
    let chart = yaml_file(&chart_dir().join("Chart.yaml"))?;
    ensure!(str_at(&chart, &["apiVersion"])? == "v2");
    ensure!(str_at(&chart, &["name"])? == "circuit");
    str_at(&chart, &["version"])?;
    ensure!(str_at(&chart, &["appVersion"])? == env!("CARGO_PKG_VERSION"));

    let objects = helm_template(None)?;
    let kinds: BTreeSet<&str> = objects.iter().map(kind).collect();
    ensure!(
        kinds == BTreeSet::from(["ConfigMap", "DaemonSet", "ServiceAccount"]),
        "{kinds:?}"
    );
    for object in &objects {
        ensure!(str_at(object, &["metadata", "namespace"])? == "circuit-system");
    }
    let args = check_agent_daemonset(&objects)?;
    let values = chart_values()?;
    let pairs = flags(&args)?;
    ensure!(one_value(&pairs, "--pin-dir")? == str_at(&values, &["pinDir"])?);
    ensure!(one_value(&pairs, "--xdp-mode")? == str_at(&values, &["xdpMode"])?);
    ensure!(values_of(&pairs, "--enforce") == ["cgroup", "xdp"]);
    ensure!(values_of(&pairs, "--iface").is_empty());

    let ds = only(&objects, "DaemonSet")?;
    let agent = agent_container(ds)?;
    ensure!(str_at(&agent, &["image"])? == format!("circuit-agent:{}", env!("CARGO_PKG_VERSION")));
    ensure!(at(&agent, &["resources"])? == at(&values, &["resources"])?);
    ensure!(
        at(ds, &["spec", "template", "spec", "tolerations"])? == at(&values, &["tolerations"])?
    );
    Ok(())
}

#[test]
fn helm_values_become_repeated_flags() -> Result<()> {
    let objects = helm_template(Some(HELM_OVERRIDES))?;
    let args = check_agent_daemonset(&objects)?;
    let pairs = flags(&args)?;
    ensure!(values_of(&pairs, "--iface") == ["eth0", "ens5"], "{args:?}");
    ensure!(
        values_of(&pairs, "--enforce") == ["cgroup", "tc"],
        "{args:?}"
    );
    ensure!(one_value(&pairs, "--xdp-mode")? == "generic");
    ensure!(one_value(&pairs, "--pin-dir")? == "/sys/fs/bpf/circuit-test");
    Ok(())
}

#[test]
fn helm_default_config_is_deploy_config_circuit_toml() -> Result<()> {
    ensure!(
        str_at(&chart_values()?, &["config"])?.is_empty(),
        "values.yaml `config` is empty by default: the chart reads circuit.toml"
    );
    let objects = helm_template(None)?;
    ensure!(
        str_at(only(&objects, "ConfigMap")?, &["data", "circuit.toml"])? == shipped_config()?,
        "the rendered ConfigMap is not deploy/config/circuit.toml"
    );
    // Whatever the config, the rendered ConfigMap carries it verbatim.
    let odd = "config: |\n  [agent]\n  pin_dir = \"/sys/fs/bpf/x\"\n\n  # \"quoted\" \\ and {{ braces }}\n";
    let objects = helm_template(Some(odd))?;
    let config = only(&objects, "ConfigMap")?;
    ensure!(
        str_at(config, &["data", "circuit.toml"])?
            == "[agent]\npin_dir = \"/sys/fs/bpf/x\"\n\n# \"quoted\" \\ and {{ braces }}\n"
    );
    Ok(())
}

#[test]
fn shipped_config_is_valid_toml() -> Result<()> {
    let config = shipped_config()?;
    toml::from_str::<toml::Table>(&config).context("deploy/config/circuit.toml")?;
    Ok(())
}

#[test]
fn shipped_config_passes_check_config() {
    let path = deploy_dir().join("config/circuit.toml");
    let out = agent().arg("check-config").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "circuit-agent check-config {} failed ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The commented-out examples in circuit.toml stay valid as the schema evolves.
#[test]
fn every_flag_the_deployments_pass_is_accepted_by_circuit_agent() -> Result<()> {
    let help = attach_help();
    let mut problems = Vec::new();
    for (what, args) in deployed_command_lines()? {
        ensure!(
            args.first().map(String::as_str) == Some("attach"),
            "{what}: {args:?}"
        );
        for (flag, _) in flags(&args)? {
            if !mentions_flag(&help, &flag) {
                problems.push(format!(
                    "{what}: `circuit-agent attach --help` has no {flag}"
                ));
            }
        }
        // clap parses every value before it acts on --help, so this exits 0 only if every
        // flag exists and every value parses (addresses, enforcement points, modes).
        let out = agent().args(&args).arg("--help").output()?;
        if !out.status.success() {
            problems.push(format!(
                "{what}: `circuit-agent {} --help` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    ensure!(problems.is_empty(), "\n{}", problems.join("\n"));
    Ok(())
}

#[test]
fn dockerfile_builds_in_a_toolchain_stage_and_ships_only_the_binary() -> Result<()> {
    let dockerfile = Dockerfile::read()?;
    ensure!(dockerfile.stages() == 2, "a builder and a runtime stage");

    // Builder: Rust on bookworm, at least the workspace's rust-version.
    let workspace: toml::Table = toml::from_str(&read(&repo_root().join("Cargo.toml"))?)?;
    let rust_version = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .context("workspace rust-version")?;
    let from = dockerfile.in_stage(0, "FROM");
    ensure!(
        from == [format!("rust:{rust_version}-bookworm AS builder")],
        "builder FROM {from:?}"
    );

    // The install steps of `cargo xtask setup`, with the versions of toolchain.env (sourced,
    // never repeated here); not its mounts.
    let run = dockerfile.in_stage(0, "RUN").join("\n");
    let env = "/etc/circuit-toolchain.env";
    ensure!(
        dockerfile
            .in_stage(0, "COPY")
            .contains(&format!("toolchain.env {env}")),
        "the builder copies toolchain.env"
    );
    for needle in [
        "apt-get install -y --no-install-recommends \"llvm-${LLVM_VERSION}-dev\"",
        "rustup toolchain install \"${RUST_NIGHTLY}\" --profile minimal --component rust-src",
        "/toolchains/nightly-",
        "LLVM_PREFIX=\"/usr/lib/llvm-${LLVM_VERSION}\"",
        "cargo install \"bpf-linker@${BPF_LINKER_VERSION}\" --locked",
        "--no-default-features --features \"llvm-${LLVM_VERSION}\"",
        "cargo build --release --locked -p circuit-agent",
    ] {
        ensure!(
            run.contains(needle),
            "the builder does not run {needle:?}:\n{run}"
        );
    }
    for step in dockerfile.in_stage(0, "RUN") {
        ensure!(
            !step.contains("${") || step.starts_with(&format!(". {env} &&")),
            "a step that uses toolchain versions must source {env} first: {step}"
        );
    }
    let text = read(&deploy_dir().join("Dockerfile"))?;
    for (key, value) in toolchain()? {
        // A bare "22" could be anything; LLVM's version is repeated as "llvm-22".
        let repeated = if key == "LLVM_VERSION" {
            format!("llvm-{value}")
        } else {
            value.clone()
        };
        ensure!(
            !text.contains(&repeated),
            "deploy/Dockerfile repeats {key}={value}: toolchain.env is its one source"
        );
    }
    ensure!(
        !run.contains("mount ") && !run.contains("xtask"),
        "a docker build cannot mount bpffs/tracefs: replicate setup's install steps only"
    );

    // Runtime: Debian slim with the binary, the default config and nothing built.
    let from = dockerfile.in_stage(1, "FROM");
    ensure!(from == ["debian:bookworm-slim"], "runtime FROM {from:?}");
    ensure!(
        dockerfile.in_stage(1, "RUN").is_empty(),
        "the runtime stage installs nothing"
    );
    ensure!(
        dockerfile.in_stage(1, "USER").is_empty(),
        "the agent runs as root"
    );
    let copies = dockerfile.in_stage(1, "COPY");
    ensure!(
        copies.contains(
            &"--from=builder /src/target/release/circuit-agent /usr/local/bin/circuit-agent"
                .to_owned()
        ),
        "the runtime stage must copy target/release/circuit-agent from the builder: {copies:?}"
    );
    ensure!(
        copies.contains(&format!("deploy/config/circuit.toml {CONFIG_PATH}")),
        "{copies:?}"
    );
    ensure!(
        dockerfile.in_stage(0, "WORKDIR") == ["/src"],
        "the builder works in /src"
    );
    ensure!(dockerfile.exec_form("ENTRYPOINT")? == ["circuit-agent"]);
    ensure!(dockerfile.exec_form("CMD")? == ["attach", "--config", CONFIG_PATH]);

    // The build context stays small.
    let ignore = read(&deploy_dir().join("Dockerfile.dockerignore"))?;
    ensure!(ignore.lines().any(|l| l.trim() == "**/target"));
    Ok(())
}

// The renderer itself, on the constructs the chart uses.

fn render(template: &str, values: &str) -> Result<String> {
    static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("helm-case-{}-{case}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let path = dir.join("t.yaml");
    fs::write(&path, template)?;
    let mut root: Value = serde_norway::from_str("Release: {Name: r}")?;
    root["Values"] = serde_norway::from_str(values)?;
    let out = helm_render(&[path], &root);
    fs::remove_dir_all(&dir)?;
    let out = out?;
    Ok(out
        .strip_prefix("---\n# Source: t.yaml\n")
        .context("no source header")?
        .to_owned())
}

#[test]
fn charts_render_with_helm_functions_and_whitespace_control() -> Result<()> {
    let template = "args:\n  - a\n  {{- range .Values.l }}\n  - {{ . | quote }}\n  {{- end }}\nname: {{ .Release.Name }}-x\nsel:\n  {{- toYaml .Values.m | nindent 2 }}\n";
    let out = render(template, "l: [b, c]\nm: {k: v, items: [1, 2]}")?;
    assert_eq!(
        out,
        "args:\n  - a\n  - \"b\"\n  - \"c\"\nname: r-x\nsel:\n  items:\n    - 1\n    - 2\n  k: v\n\n"
    );
    Ok(())
}

#[test]
fn a_value_the_chart_names_but_values_lack_is_an_error() {
    let err = render("x: {{ .Values.missing.key }}\n", "present: 1").unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}
