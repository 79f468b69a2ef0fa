//! deploy/monitoring/ with real Prometheus parts: Debian's `promtool` checks the rules and runs the
//! unit tests under deploy/monitoring/tests/ (series that fire each alert and series that do not);
//! the PrometheusRule is the plain rules file's content; the PodMonitor scrapes what the DaemonSet
//! serves; and the component renders with kustomize on top of deploy/.
//!
//! `promtool` comes with Debian's `prometheus` package: scripts/setup-monitoring.sh installs it
//! (scripts/test.sh runs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn yaml(relative: &str) -> Value {
    serde_yaml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Every YAML document of a file.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn promtool(args: &[&str]) -> Output {
    match Command::new("promtool")
        .args(args)
        .current_dir(ROOT)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool not found: run scripts/setup-monitoring.sh (installs Debian's `prometheus` \
             package, which ships promtool)"
        ),
        Err(e) => panic!("promtool: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The rule unit-test files, deploy/monitoring/tests/*.yaml.
fn unit_test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(path("deploy/monitoring/tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no rule tests in deploy/monitoring/tests"
    );
    files
}

/// (alert name, severity) of every alerting rule in rules.yaml, and the rules themselves.
fn alerts() -> Vec<(String, String, Value)> {
    let rules = yaml("deploy/monitoring/rules.yaml");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .expect("only alerting rules")
                .to_string();
            let severity = rule["labels"]["severity"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            out.push((name, severity, rule.clone()));
        }
    }
    out
}

#[test]
fn promtool_checks_the_rules() {
    let out = promtool(&["check", "rules", "deploy/monitoring/rules.yaml"]);
    let said = text(&out);
    assert!(out.status.success(), "promtool check rules failed:\n{said}");
    let count = alerts().len();
    assert!(
        said.contains(&format!("SUCCESS: {count} rules found")),
        "expected {count} rules: {said}"
    );
    let version = text(&promtool(&["--version"]));
    eprintln!("{}", version.lines().next().unwrap_or_default());
}

#[test]
fn promtool_unit_tests_pass() {
    for file in unit_test_files() {
        let file = file.to_str().unwrap();
        let out = promtool(&["test", "rules", file]);
        assert!(
            out.status.success(),
            "promtool test rules {file} failed:\n{}",
            text(&out)
        );
        assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
    }
}

/// Each alert (each severity of it) is shown firing by some unit test, and not firing by another.
#[test]
fn every_alert_has_firing_and_quiet_cases() {
    let mut fired: BTreeSet<(String, String)> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    for file in unit_test_files() {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(
            doc["rule_files"],
            Value::Sequence(vec![Value::String("../rules.yaml".into())]),
            "{}: tests the shipped rules file",
            file.display()
        );
        for case in doc["tests"].as_sequence().unwrap() {
            for check in case["alert_rule_test"].as_sequence().unwrap() {
                let name = check["alertname"].as_str().unwrap().to_string();
                let expected = check["exp_alerts"].as_sequence().unwrap();
                if expected.is_empty() {
                    quiet.insert(name.clone());
                }
                for alert in expected {
                    let severity = alert["exp_labels"]["severity"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    fired.insert((name.clone(), severity));
                }
            }
        }
    }
    for (name, severity, _) in alerts() {
        assert!(
            fired.contains(&(name.clone(), severity.clone())),
            "no unit test shows {name} ({severity}) firing"
        );
        assert!(
            quiet.contains(&name),
            "no unit test shows {name} not firing"
        );
    }
}

/// Each alert says what is wrong and what to do, has a severity and waits before firing.
#[test]
fn every_alert_is_complete() {
    let mut seen = BTreeMap::new();
    for (name, severity, rule) in alerts() {
        assert!(
            ["warning", "critical"].contains(&severity.as_str()),
            "{name}: severity {severity:?}"
        );
        assert!(
            seen.insert((name.clone(), severity.clone()), ()).is_none(),
            "{name} ({severity}) twice"
        );
        assert!(rule["for"].as_str().is_some(), "{name}: no `for:`");
        for annotation in ["summary", "description"] {
            let said = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(said.len() > 20, "{name}: {annotation} {said:?}");
        }
        let expr = rule["expr"].as_str().unwrap();
        assert!(
            expr.contains("job=\"hostvol\"") || expr.contains("kube_pod_owner"),
            "{name} selects the agents' job: {expr}"
        );
    }
    let names: BTreeSet<&str> = seen.keys().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "HostvolVolumeAlmostFull",
        "HostvolVolumeFillingUp",
        "HostvolAgentDown",
        "HostvolAgentNotReady",
        "HostvolProvisioningFailing",
        "HostvolQuotaNotEnforced",
    ] {
        assert!(names.contains(wanted), "{wanted} missing: {names:?}");
    }
}

/// The metric names the rules use are the ones the agent exports.
#[test]
fn rules_use_exported_metrics() {
    let exported = read("src/controller/metrics.rs");
    let rules = read("deploy/monitoring/rules.yaml");
    let used: BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("hostvol_"))
        .collect();
    assert!(!used.is_empty());
    for metric in used {
        let base = metric.strip_prefix("hostvol_").unwrap();
        let base = base.strip_suffix("_total").unwrap_or(base);
        assert!(
            exported.contains(&format!("\"{base}\"")),
            "{metric} is not registered in src/controller/metrics.rs"
        );
    }
}

/// prometheusrule.yaml, generated from rules.yaml: its `spec` is the plain file, line for line.
fn generated_prometheus_rule() -> String {
    let rules = read("deploy/monitoring/rules.yaml");
    let mut out = String::from(
        "# GENERATED from rules.yaml by tests/monitoring.rs (HOSTVOL_UPDATE_MONITORING=1 cargo test --test\n\
         # monitoring): edit rules.yaml, not this file.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  \
           name: hostvol\n  \
           namespace: hostvol-system\n  \
           labels:\n    \
             app.kubernetes.io/name: hostvol\n    \
             app.kubernetes.io/component: agent\n    \
             app.kubernetes.io/part-of: hostvol\n\
         spec:\n",
    );
    for line in rules.lines().skip_while(|l| l.starts_with('#')) {
        if !line.is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn prometheus_rule_is_the_rules_file() {
    let want = generated_prometheus_rule();
    let file = path("deploy/monitoring/prometheusrule.yaml");
    if std::env::var_os("HOSTVOL_UPDATE_MONITORING").is_some() {
        std::fs::write(&file, &want).unwrap();
    }
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        have == want,
        "deploy/monitoring/prometheusrule.yaml is not rules.yaml's content: run \
         HOSTVOL_UPDATE_MONITORING=1 cargo test --test monitoring"
    );
    // And parsed: the same rules, not just the same text.
    let object = yaml("deploy/monitoring/prometheusrule.yaml");
    assert_eq!(object["spec"], yaml("deploy/monitoring/rules.yaml"));
}

/// The PodMonitor selects the DaemonSet's pods by their labels and scrapes its named metrics port.
#[test]
fn pod_monitor_scrapes_the_agents() {
    let monitor = yaml("deploy/monitoring/podmonitor.yaml");
    let daemonset = yaml("deploy/daemonset.yaml");
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "pod label {k:?}");
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let http = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(port))
        .unwrap_or_else(|| panic!("the DaemonSet has no port named {port}"));
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_str(),
        Some(port)
    );
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(9808),
        "--http-addr's port"
    );
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(
        endpoint["honorLabels"].as_bool(),
        Some(true),
        "the claims' `namespace` label must win over the target's"
    );
    let sets_job = endpoint["relabelings"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|r| {
            r["targetLabel"].as_str() == Some("job") && r["replacement"].as_str() == Some("hostvol")
        });
    assert!(sets_job, "the rules select job=\"hostvol\"");
}

/// The component renders on top of deploy/ with kustomize (kubectl's) and changes nothing else.
#[test]
fn component_renders_with_kustomize() {
    // kustomize takes only relative paths: an overlay inside the repository (target/tmp).
    let overlay = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let depth = overlay
        .path()
        .strip_prefix(ROOT)
        .expect("the target directory inside the repository")
        .components()
        .count();
    let root = "../".repeat(depth);
    let kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{root}deploy]\n\
         components: [{root}deploy/monitoring]\n"
    );
    std::fs::write(overlay.path().join("kustomization.yaml"), kustomization).unwrap();
    let render = |dir: &Path| {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("kubectl (scripts/ensure-tools.sh installs it)");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            text(&out)
        );
        documents(&String::from_utf8(out.stdout).unwrap())
    };
    let with = render(overlay.path());
    let base = render(&path("deploy"));
    let kinds: Vec<&str> = with.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"PodMonitor"), "{kinds:?}");
    assert!(kinds.contains(&"PrometheusRule"), "{kinds:?}");
    let rest: Vec<&Value> = with
        .iter()
        .filter(|d| !["PodMonitor", "PrometheusRule"].contains(&d["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rest,
        base.iter().collect::<Vec<_>>(),
        "the component changes only its own objects"
    );
    let rule = with.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    assert_eq!(rule["spec"], yaml("deploy/monitoring/rules.yaml"));
}
