//! `hostvol capacity` and `hostvol volumes`: reports for people, gathered from every agent's node service.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cli::agents::{Target, targets};
use crate::cli::args::{OutputFormat, ReportArgs, VolumesArgs};
use crate::domain::quantity::format_bytes;
use crate::service::grpc::v1::{
    CapacityReport, GetCapacityRequest, ListOrphansRequest, ListOrphansResponse,
    ListVolumesRequest, LostVolume, Orphan, Volume,
};

/// A row of `hostvol capacity`: the report of a reachable agent or the reason it could not be asked.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityRow {
    pub node: String,
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub report: Option<CapacityFigures>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityFigures {
    pub data_root: String,
    pub filesystem_type: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub used_inodes: u64,
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub cap_bytes: Option<u64>,
    pub allocatable_bytes: u64,
    pub volumes: u32,
    /// How sizes are enforced: a quota mechanism, `none` or `unavailable`.
    pub quota: String,
}

impl From<&CapacityReport> for CapacityFigures {
    fn from(r: &CapacityReport) -> Self {
        CapacityFigures {
            data_root: r.data_root.clone(),
            filesystem_type: r.filesystem_type.clone(),
            total_bytes: r.total_bytes,
            available_bytes: r.available_bytes,
            used_bytes: r.used_bytes,
            total_inodes: r.total_inodes,
            used_inodes: r.used_inodes,
            allocated_bytes: r.allocated_bytes,
            reserved_bytes: r.reserved_bytes,
            cap_bytes: r.cap_bytes,
            allocatable_bytes: r.allocatable_bytes,
            volumes: r.volume_count,
            quota: r.quota.clone(),
        }
    }
}

pub fn render_capacity(rows: &[CapacityRow], wide: bool) -> String {
    let mut header = vec![
        "NODE",
        "FILESYSTEM",
        "TOTAL",
        "USED",
        "ALLOCATED",
        "ALLOCATABLE",
        "VOLUMES",
    ];
    if wide {
        header.extend([
            "AVAILABLE",
            "RESERVED",
            "CAP",
            "INODES",
            "QUOTA",
            "DATA ROOT",
            "ENDPOINT",
        ]);
    }
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let mut totals = (0u64, 0u64, 0u64, 0u64, 0u32);
    for row in rows {
        let mut line = vec![row.node.clone()];
        match (&row.report, &row.error) {
            (Some(r), _) => {
                totals = (
                    totals.0 + r.total_bytes,
                    totals.1 + r.used_bytes,
                    totals.2 + r.allocated_bytes,
                    totals.3 + r.allocatable_bytes,
                    totals.4 + r.volumes,
                );
                line.extend([
                    r.filesystem_type.clone(),
                    format_bytes(r.total_bytes),
                    format_bytes(r.used_bytes),
                    format_bytes(r.allocated_bytes),
                    format_bytes(r.allocatable_bytes),
                    r.volumes.to_string(),
                ]);
                if wide {
                    line.extend([
                        format_bytes(r.available_bytes),
                        format_bytes(r.reserved_bytes),
                        r.cap_bytes.map_or("-".into(), format_bytes),
                        format!("{}/{}", r.used_inodes, r.total_inodes),
                        if r.quota.is_empty() {
                            "-".into()
                        } else {
                            r.quota.clone()
                        },
                        r.data_root.clone(),
                        row.endpoint.clone(),
                    ]);
                }
            }
            (None, error) => {
                line.push(format!(
                    "unreachable: {}",
                    error.clone().unwrap_or_default()
                ));
            }
        }
        table.push(line);
    }
    let mut total = vec!["TOTAL".to_string(), String::new()];
    total.extend([
        format_bytes(totals.0),
        format_bytes(totals.1),
        format_bytes(totals.2),
        format_bytes(totals.3),
        totals.4.to_string(),
    ]);
    table.push(total);
    align(&table)
}

/// Left-aligned columns separated by three spaces, like kubectl. A row with fewer cells (an
/// unreachable agent's message) lets its last cell run on.
fn align(table: &[Vec<String>]) -> String {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in table.iter().filter(|r| r.len() == columns) {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == row.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// `hostvol capacity`. Returns whether every agent answered.
pub async fn capacity(args: &ReportArgs) -> Result<bool, String> {
    let targets = targets(args).await?;
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let asks = targets.iter().map(|target| async move {
        let endpoint = target.endpoint();
        let result = match target.connect(timeout).await {
            Ok(mut client) => client
                .get_capacity(GetCapacityRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(report) => CapacityRow {
                node: report.node.clone(),
                endpoint,
                error: None,
                report: Some((&report).into()),
            },
            Err(error) => CapacityRow {
                node: target.node.clone(),
                endpoint,
                error: Some(error),
                report: None,
            },
        }
    });
    let rows: Vec<CapacityRow> = futures::future::join_all(asks).await;
    let all_answered = rows.iter().all(|r| r.error.is_none());
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        ),
        OutputFormat::Table => print!("{}", render_capacity(&rows, false)),
        OutputFormat::Wide => print!("{}", render_capacity(&rows, true)),
    }
    Ok(all_answered)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRow {
    pub node: String,
    pub pv_name: String,
    pub claim: String,
    pub storage_class: String,
    pub capacity_bytes: u64,
    pub used_bytes: Option<u64>,
    pub phase: String,
    pub reclaim_policy: String,
    pub created_unix: Option<i64>,
    pub directory: String,
}

impl VolumeRow {
    fn new(node: &str, v: &Volume) -> Self {
        VolumeRow {
            node: node.to_string(),
            pv_name: v.pv_name.clone(),
            claim: format!("{}/{}", v.claim_namespace, v.claim_name),
            storage_class: v.storage_class.clone(),
            capacity_bytes: v.capacity_bytes,
            used_bytes: v.used_bytes,
            phase: v.phase.clone(),
            reclaim_policy: v.reclaim_policy.clone(),
            created_unix: v.created_at.as_ref().map(|t| t.seconds),
            directory: v.directory.clone(),
        }
    }
}

/// "5d", "3h", "12m", "40s", like kubectl's AGE column.
pub fn age(created_unix: Option<i64>, now: SystemTime) -> String {
    let Some(created) = created_unix else {
        return "-".into();
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let s = (now - created).max(0);
    match s {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn render_volumes(rows: &[VolumeRow], wide: bool, now: SystemTime) -> String {
    let mut header = vec![
        "NODE", "VOLUME", "CLAIM", "CAPACITY", "USED", "USE%", "PHASE", "RECLAIM", "AGE",
    ];
    if wide {
        header.extend(["CLASS", "DIRECTORY"]);
    }
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        let percent = match r.used_bytes {
            Some(used) if r.capacity_bytes > 0 => {
                format!("{}%", used.saturating_mul(100) / r.capacity_bytes)
            }
            _ => "-".into(),
        };
        let mut line = vec![
            r.node.clone(),
            r.pv_name.clone(),
            r.claim.clone(),
            format_bytes(r.capacity_bytes),
            r.used_bytes.map_or("-".into(), format_bytes),
            percent,
            r.phase.clone(),
            r.reclaim_policy.clone(),
            age(r.created_unix, now),
        ];
        if wide {
            line.extend([r.storage_class.clone(), r.directory.clone()]);
        }
        table.push(line);
    }
    align(&table)
}

/// `hostvol volumes`. Returns whether every agent answered.
pub async fn volumes(args: &VolumesArgs) -> Result<bool, String> {
    let mut targets = targets(&args.report).await?;
    if let Some(node) = &args.node {
        targets.retain(|t| &t.node == node || t.node.is_empty());
        if targets.is_empty() {
            return Err(format!("no hostvol agent on node {node}"));
        }
    }
    let timeout = Duration::from_secs(args.report.timeout_seconds.max(1));
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for target in &targets {
        let answer = match target.connect(timeout).await {
            Ok(mut client) => {
                let node = match client.get_capacity(GetCapacityRequest {}).await {
                    Ok(r) => r.into_inner().node,
                    Err(_) => target.node.clone(),
                };
                client
                    .list_volumes(ListVolumesRequest {})
                    .await
                    .map(|r| (node, r.into_inner().volumes))
                    .map_err(|s| s.message().to_string())
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok((node, volumes)) => rows.extend(
                volumes
                    .iter()
                    .filter(|v| !args.released || v.phase == "Released")
                    .map(|v| VolumeRow::new(&node, v)),
            ),
            Err(error) => failures.push(format!("node {}: unreachable: {error}", target.node)),
        }
    }
    match args.report.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        ),
        OutputFormat::Table => print!("{}", render_volumes(&rows, false, SystemTime::now())),
        OutputFormat::Wide => print!("{}", render_volumes(&rows, true, SystemTime::now())),
    }
    for failure in &failures {
        eprintln!("{failure}");
    }
    Ok(failures.is_empty())
}

/// `hostvol doctor`: orphaned directories and lost volumes of every node. Returns whether every agent answered.
pub async fn doctor(args: &ReportArgs) -> Result<bool, String> {
    let targets = targets(args).await?;
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    let mut findings = Findings::new();
    let now = SystemTime::now();
    for target in &targets {
        match ask_orphans(target, timeout).await {
            Ok((node, found)) => {
                findings.add_orphans(&node, &found.orphans, now);
                findings.add_lost(&node, &found.lost);
            }
            Err(error) => findings.add_unreachable(&target.node, error),
        }
    }
    findings.print(args.output, targets.len());
    Ok(findings.unreachable == 0)
}

/// The agent's node name (as it reports it, else as discovered) and its orphans and lost volumes.
async fn ask_orphans(
    target: &Target,
    timeout: Duration,
) -> Result<(String, ListOrphansResponse), String> {
    let mut client = target.connect(timeout).await?;
    let node = client
        .get_capacity(GetCapacityRequest {})
        .await
        .map(|r| r.into_inner().node)
        .unwrap_or_else(|_| target.node.clone());
    client
        .list_orphans(ListOrphansRequest {})
        .await
        .map(|r| (node, r.into_inner()))
        .map_err(|s| s.message().to_string())
}

/// What `hostvol doctor` found, as table rows and as JSON rows, with counts for the summary.
struct Findings {
    table: Vec<Vec<String>>,
    json_rows: Vec<serde_json::Value>,
    orphans: usize,
    lost: usize,
    unreachable: usize,
}

impl Findings {
    fn new() -> Self {
        Findings {
            table: vec![
                ["NODE", "PROBLEM", "NAME", "DETAIL"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ],
            json_rows: Vec::new(),
            orphans: 0,
            lost: 0,
            unreachable: 0,
        }
    }

    fn add_orphans(&mut self, node: &str, orphans: &[Orphan], now: SystemTime) {
        for o in orphans {
            self.orphans += 1;
            let age = age(o.modified_at.as_ref().map(|t| t.seconds), now);
            let (problem, detail) = if o.archived {
                (
                    "archived",
                    format!(
                        "kept by onDelete=archive, {age} old; remove by hand when no longer needed"
                    ),
                )
            } else {
                let root = match o.root.as_str() {
                    "" | "default" => String::new(),
                    other => format!(" --root {other}"),
                };
                (
                    "orphan",
                    format!(
                        "directory with no PV, {age} old; to give it to a new claim, as root on {node}: \
                         hostvol reuse --directory {}{root} --for NAMESPACE/CLAIM",
                        o.name
                    ),
                )
            };
            self.table.push(vec![
                node.to_string(),
                problem.into(),
                o.path.clone(),
                detail.clone(),
            ]);
            self.json_rows.push(serde_json::json!({"node": node, "problem": problem, "path": o.path, "detail": detail}));
        }
    }

    fn add_lost(&mut self, node: &str, lost: &[LostVolume]) {
        for l in lost {
            self.lost += 1;
            let detail = format!(
                "claim {}/{} ({}): directory {} is missing",
                l.claim_namespace, l.claim_name, l.phase, l.directory
            );
            self.table.push(vec![
                node.to_string(),
                "lost".into(),
                l.pv_name.clone(),
                detail.clone(),
            ]);
            self.json_rows.push(serde_json::json!({"node": node, "problem": "lost", "pv": l.pv_name, "detail": detail}));
        }
    }

    fn add_unreachable(&mut self, node: &str, error: String) {
        self.unreachable += 1;
        self.table.push(vec![
            node.to_string(),
            "unreachable".into(),
            String::new(),
            error.clone(),
        ]);
        self.json_rows
            .push(serde_json::json!({"node": node, "problem": "unreachable", "detail": error}));
    }

    /// Prints the findings, or for a table a summary after them; `nodes` is how many agents were asked.
    fn print(&self, output: OutputFormat, nodes: usize) {
        let (orphans, lost, answered) = (self.orphans, self.lost, nodes - self.unreachable);
        match output {
            OutputFormat::Json => println!(
                "{}",
                serde_json::to_string_pretty(&self.json_rows).expect("rows serialise")
            ),
            _ => {
                if self.table.len() > 1 {
                    print!("{}", align(&self.table));
                }
                println!(
                    "{orphans} orphaned or archived director{}, {lost} lost volume{} on {answered} node{}; nothing was deleted",
                    if orphans == 1 { "y" } else { "ies" },
                    if lost == 1 { "" } else { "s" },
                    if answered == 1 { "" } else { "s" },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(total: u64, allocated: u64, allocatable: u64, volumes: u32) -> CapacityFigures {
        CapacityFigures {
            data_root: "/mnt/data".into(),
            filesystem_type: "ext4".into(),
            total_bytes: total,
            available_bytes: total / 2,
            used_bytes: total / 2,
            total_inodes: 100,
            used_inodes: 10,
            allocated_bytes: allocated,
            reserved_bytes: 0,
            cap_bytes: None,
            allocatable_bytes: allocatable,
            volumes,
            quota: "btrfs-qgroup".into(),
        }
    }

    #[test]
    fn capacity_table_has_a_total_row_and_marks_unreachable_agents() {
        let gi = 1u64 << 30;
        let rows = vec![
            CapacityRow {
                node: "node-a".into(),
                endpoint: "10.0.0.1:9809".into(),
                error: None,
                report: Some(figures(100 * gi, 5 * gi, 45 * gi, 2)),
            },
            CapacityRow {
                node: "node-b".into(),
                endpoint: "10.0.0.2:9809".into(),
                error: Some("connection refused".into()),
                report: None,
            },
            CapacityRow {
                node: "node-c".into(),
                endpoint: "10.0.0.3:9809".into(),
                error: None,
                report: Some(figures(20 * gi, gi, 9 * gi, 1)),
            },
        ];
        let text = render_capacity(&rows, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NODE") && lines[0].contains("ALLOCATABLE"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("node-a")
                && lines[1].contains("100Gi")
                && lines[1].contains("45Gi"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("node-b") && lines[2].contains("unreachable: connection refused"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("TOTAL")
                && lines[4].contains("120Gi")
                && lines[4].contains("54Gi")
                && lines[4].ends_with('3'),
            "{text}"
        );
        assert!(render_capacity(&rows, true).contains("10.0.0.3:9809"));
        assert!(render_capacity(&rows, true).contains("btrfs-qgroup"));
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(age(Some(1_000_000 - 30), now), "30s");
        assert_eq!(age(Some(1_000_000 - 7200), now), "2h");
        assert_eq!(age(Some(1_000_000 - 3 * 86_400), now), "3d");
        assert_eq!(age(None, now), "-");
    }
}
