//! The Grafana dashboards in `deploy/grafana/` query only what is
//! exported: every PromQL expression in them is read, and each metric it
//! names must be declared by the `/metrics` of a running control plane
//! (`control-plane.json`) or agent (`agent.json`), kube-proxy's names
//! included. A metric renamed in the code, or a dashboard typo, fails here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use switchyard_integration_tests::*;

/// PromQL's functions and aggregations (those the dashboards may call).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "avg",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_replace",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "quantile",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "stddev",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "bottomk",
    "vector",
];

/// Keywords that are not metric names; those followed by a label list.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects, or why it does not read.
/// A lexer, not a full parser: it skips strings, label matchers (`{...}`),
/// ranges (`[...]`), Grafana variables (`$name`), numbers, and the label
/// lists of `by (...)` and its kin; every other name followed by `(` must
/// be a PromQL function, and brackets must balance.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut stack: Vec<char> = Vec::new();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    // Whether the word at `j` is `by`, `without` and the like.
    let followed_by_label_list = |j: usize| {
        let end = (j..chars.len())
            .find(|&k| !ident(chars[k]))
            .unwrap_or(chars.len());
        let word: String = chars[j..end].iter().collect();
        LABEL_LISTS.contains(&word.as_str())
    };
    // The end of the string literal opening at `j`.
    let string_end = |j: usize| -> Result<usize, String> {
        let quote = chars[j];
        let mut k = j + 1;
        while k < chars.len() {
            if chars[k] == '\\' {
                k += 2;
                continue;
            }
            if chars[k] == quote {
                return Ok(k + 1);
            }
            k += 1;
        }
        Err(format!("an unterminated string at {j}"))
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '"' | '\'' | '`' => i = string_end(i)?,
            '{' | '[' => {
                // Label matchers and ranges: skipped whole, strings included.
                let close = if c == '{' { '}' } else { ']' };
                let mut k = i + 1;
                loop {
                    match chars.get(k) {
                        None => return Err(format!("{c} at {i} is never closed")),
                        Some('"' | '\'' | '`') => k = string_end(k)?,
                        Some(&x) if x == close => break,
                        Some('{' | '[') => return Err(format!("a bracket inside {c} at {i}")),
                        Some(_) => k += 1,
                    }
                }
                i = k + 1;
            }
            '}' | ']' => return Err(format!("{c} at {i} closes nothing")),
            '(' => {
                stack.push('(');
                i += 1;
            }
            ')' => {
                stack
                    .pop()
                    .ok_or_else(|| format!(") at {i} closes nothing"))?;
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
            }
            _ if c.is_ascii_digit() || c == '.' => {
                // A number (1, 0.99, 1e9) or a duration (5m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ if ident(c) => {
                let start = i;
                while i < chars.len() && ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = skip_space(i);
                if LABEL_LISTS.contains(&word.as_str()) {
                    // `by (a, b)`: label names, not metrics.
                    if chars.get(next) == Some(&'(') {
                        let close = chars[next..]
                            .iter()
                            .position(|&x| x == ')')
                            .ok_or_else(|| format!("{word} ( at {next} is never closed"))?;
                        i = next + close + 1;
                    }
                } else if chars.get(next) == Some(&'(') || followed_by_label_list(next) {
                    // `sum(...)`, or `sum by (a) (...)`.
                    if !FUNCTIONS.contains(&word.as_str()) {
                        return Err(format!("{word}( is not a PromQL function"));
                    }
                } else if !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                    names.push(word);
                }
            }
            '+' | '-' | '*' | '/' | '%' | '^' | ',' | '=' | '!' | '<' | '>' => i += 1,
            _ => return Err(format!("{c:?} at {i} is not PromQL")),
        }
    }
    if !stack.is_empty() {
        return Err("an unclosed (".into());
    }
    if names.is_empty() {
        return Err("it selects no metric".into());
    }
    Ok(names)
}

#[test]
fn the_lexer_finds_metrics_and_refuses_what_is_not_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, service_kind) (rate(a_bucket{instance=~"$instance",x="}"}[$__rate_interval])))"#,
    )
    .expect("reads");
    assert_eq!(names, ["a_bucket"]);
    let names =
        metric_names("count(a > on (instance) group_left b) or vector(0) - time() + c offset 5m")
            .expect("reads");
    assert_eq!(names, ["a", "b", "c"]);
    let names = metric_names("max by (source) (a) / sum without (x) (b)").expect("reads");
    assert_eq!(names, ["a", "b"]);
    assert!(metric_names("rat(a[5m])").is_err(), "an unknown function");
    assert!(metric_names("sum(a").is_err(), "an unclosed (");
    assert!(metric_names("a{x=\"1\"").is_err(), "an unclosed {{");
    assert!(metric_names("vector(0)").is_err(), "no metric");
}

/// Every PromQL expression of a dashboard (panels' targets, nested rows
/// included) and the metrics its variables read (`label_values(m, l)`).
fn expressions(dashboard: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    fn walk(v: &serde_json::Value, exprs: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => exprs.push(e.clone()),
                        _ => walk(v, exprs),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    let mut variables = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .expect("a query variable's query");
        let metric = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: expected label_values(METRIC, LABEL), got {query}",
                    var["name"]
                )
            });
        variables.push(metric.trim().to_owned());
    }
    (exprs, variables)
}

/// The metric names a `/metrics` body (Prometheus text 0.0.4) declares: each
/// family's `# TYPE` (a family with labels has no sample until its first
/// event) with the series names its type makes, and every sample's name.
fn exported(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                "counter" if !name.ends_with("_total") => &["_total"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

fn dashboard(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_dashboard_queries_is_exported() {
    init_logging();
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let (agent, _) = start_recording_agent(agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("agent"),
    ))
    .await;
    cp_status_until(&cp, "the agent's ACK", |s| {
        s.version.is_some() && s.agents.iter().any(|a| a.acked_version == s.version)
    })
    .await;

    let mut failures = Vec::new();
    for (file, addr) in [
        ("control-plane.json", cp.admin_addr),
        ("agent.json", agent.admin_addr),
    ] {
        let (code, body) = get_text(addr, "/metrics").await;
        assert_eq!(code, 200, "{file}: /metrics answered {code}");
        let exported = exported(&body);
        let board = dashboard(file);
        let (exprs, variables) = expressions(&board);
        assert!(
            exprs.len() >= 10,
            "{file}: only {} expressions found",
            exprs.len()
        );
        let mut queried = BTreeSet::new();
        for expr in &exprs {
            match metric_names(expr) {
                Ok(names) => queried.extend(names),
                Err(why) => failures.push(format!("{file}: {expr:?} does not read: {why}")),
            }
        }
        queried.extend(variables);
        for name in &queried {
            if !exported.contains(name) {
                failures.push(format!("{file}: {name} is queried but not exported"));
            }
        }
        if file == "agent.json" {
            assert!(
                queried.iter().any(|n| n.starts_with("kubeproxy_")),
                "the agent's dashboard charts kube-proxy's names too"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    agent.shutdown().await;
    cp.shutdown().await;
}
