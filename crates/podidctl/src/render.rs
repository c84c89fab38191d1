//! Text and JSON output of `status` and `doctor`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::explain::{Level, PodReport, Served};

/// `status` as JSON: the mode and every pod's report.
#[derive(Debug, Serialize)]
pub struct StatusDocument<'a> {
    /// `standard` or `managed`.
    pub mode: &'a str,
    /// `--forceNamespaced`.
    pub force_namespaced: bool,
    /// One report per pod, by namespace then name.
    pub pods: &'a [PodReport],
    /// Identities MIC keeps on VMs/VMSS after their last pod (its grace period).
    pub held_identities: &'a [crate::cluster::HeldIdentity],
}

/// The held identities under the status table (nothing when there are none).
pub fn held_table(held: &[crate::cluster::HeldIdentity]) -> String {
    if held.is_empty() {
        return String::new();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![vec![
        "VM/VMSS".to_owned(),
        "IDENTITY".to_owned(),
        "RELEASED IN".to_owned(),
    ]];
    for h in held {
        let name = h.id.rsplit('/').next().unwrap_or(&h.id);
        let left = h.until.saturating_sub(now);
        rows.push(vec![
            format!("{} {}", h.kind, h.name),
            name.to_owned(),
            if left == 0 {
                "due (releasing)".to_owned()
            } else {
                format!("{left}s")
            },
        ]);
    }
    format!(
        "\nIdentities held after their last pod (mic --identity-release-grace-period):\n{}",
        pad(&rows)
    )
}

fn pad(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `status` table: one row per pod and identity, grouped by namespace.
pub fn status_table(reports: &[PodReport], standard: bool) -> String {
    if reports.is_empty() {
        return "No pods with an aadpodidbinding or azure.workload.identity/use label.\n"
            .to_owned();
    }
    let mut header = vec![
        "NAMESPACE",
        "POD",
        "SERVICE-ACCOUNT",
        "IDENTITY",
        "TYPE",
        "CLIENT-ID",
        "PATH",
    ];
    if standard {
        header.push("AAI");
    }
    header.push("RESULT");
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for r in reports {
        let base = vec![
            r.namespace.clone(),
            r.name.clone(),
            r.service_account.clone(),
        ];
        let mut push = |mut cells: Vec<String>, aai: String, result: String| {
            let mut row = base.clone();
            row.append(&mut cells);
            if standard {
                row.push(aai);
            }
            row.push(result);
            rows.push(row);
        };
        let dash = || "-".to_owned();
        if !r.exceptions.is_empty() {
            push(
                vec![
                    "(node identity)".into(),
                    dash(),
                    dash(),
                    "IMDS (exception)".into(),
                ],
                dash(),
                format!("served: excepted by {}", r.exceptions.join(",")),
            );
            continue;
        }
        for id in &r.identities {
            let result = match &id.served {
                Served::Yes => "served".to_owned(),
                Served::Pending { reason } => format!("pending: {reason}"),
                Served::No { reason } => format!("none: {reason}"),
            };
            push(
                vec![
                    format!("{}/{}", id.namespace, id.name),
                    id.identity_type.to_string(),
                    id.client_id.clone(),
                    id.path.label(),
                ],
                id.assignment
                    .as_ref()
                    .map(|a| {
                        if a.state.is_empty() {
                            "(legacy)".to_owned()
                        } else {
                            a.state.clone()
                        }
                    })
                    .unwrap_or_else(|| "missing".to_owned()),
                result,
            );
        }
        if let Some(wi) = &r.workload_identity {
            push(
                vec![
                    format!("(sa {})", wi.service_account),
                    dash(),
                    wi.client_id.clone().unwrap_or_else(dash),
                    "Workload Identity".into(),
                ],
                dash(),
                if wi.served_by_nmi {
                    "served by the SDK; IMDS calls via nmi (federated)".to_owned()
                } else if wi.client_id.is_some() {
                    "served by the SDK".to_owned()
                } else {
                    "none: service account lacks azure.workload.identity/client-id".to_owned()
                },
            );
        }
        if r.identities.is_empty() && r.workload_identity.is_none() {
            let why = r
                .findings
                .iter()
                .find(|f| f.level == Level::Error)
                .map(|f| f.message.clone())
                .unwrap_or_else(|| r.default_answer.clone());
            push(
                vec![dash(), dash(), dash(), dash()],
                dash(),
                format!("none: {why}"),
            );
        }
    }
    pad(&rows)
}

/// `doctor`'s text: what the pod gets, each finding with its fix.
pub fn doctor_text(r: &PodReport, standard: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Pod {}/{}", r.namespace, r.name);
    let _ = writeln!(out, "  service account: {}", r.service_account);
    let _ = writeln!(
        out,
        "  node:            {}",
        r.node.as_deref().unwrap_or("(not scheduled)")
    );
    let _ = writeln!(
        out,
        "  label:           {}",
        r.binding_label
            .as_deref()
            .map(|l| format!("aadpodidbinding={l}"))
            .unwrap_or_else(|| "(no aadpodidbinding label)".to_owned())
    );
    let _ = writeln!(
        out,
        "  mode:            {}",
        if standard {
            "standard (MIC assigns identities)"
        } else {
            "managed"
        }
    );
    if !r.exceptions.is_empty() {
        let _ = writeln!(out, "  exception:       {}", r.exceptions.join(", "));
    }
    let _ = writeln!(out, "  default answer:  {}", r.default_answer);
    if !r.identities.is_empty() {
        let _ = writeln!(out, "\nIdentities");
        for id in &r.identities {
            let _ = writeln!(
                out,
                "  {}/{}  type {}  client id {}",
                id.namespace, id.name, id.identity_type, id.client_id
            );
            if let Some(b) = &id.binding {
                let _ = writeln!(out, "    binding:    {b}");
            }
            if standard {
                let aai = id
                    .assignment
                    .as_ref()
                    .map(|a| {
                        format!(
                            "{} ({})",
                            a.name,
                            if a.state.is_empty() {
                                "legacy"
                            } else {
                                &a.state
                            }
                        )
                    })
                    .unwrap_or_else(|| "none".to_owned());
                let _ = writeln!(out, "    assignment: {aai}");
            }
            let _ = writeln!(out, "    path:       {}", id.path.label());
            if let crate::explain::TokenPath::Federated { subject, .. } = &id.path {
                let _ = writeln!(out, "    subject:    {subject}");
            }
            let served = match &id.served {
                Served::Yes => "yes".to_owned(),
                Served::Pending { reason } => format!("pending ({reason})"),
                Served::No { reason } => format!("no ({reason})"),
            };
            let _ = writeln!(out, "    served:     {served}");
        }
    }
    if !r.rejected_bindings.is_empty() {
        let _ = writeln!(out, "\nBindings with this selector that do not apply");
        for b in &r.rejected_bindings {
            let _ = writeln!(out, "  {}: {}", b.binding, b.reason);
        }
    }
    if let Some(wi) = &r.workload_identity {
        let _ = writeln!(out, "\nWorkload Identity");
        let _ = writeln!(
            out,
            "  service account {} client id {} tenant {}",
            wi.service_account,
            wi.client_id.as_deref().unwrap_or("(none)"),
            wi.tenant_id.as_deref().unwrap_or("(cluster default)")
        );
        if wi.served_by_nmi {
            let _ = writeln!(
                out,
                "  IMDS calls: served by nmi (--serve-workload-identity-pods), federated exchange for system:serviceaccount:{}:{}",
                r.namespace, wi.service_account
            );
        }
    }
    write_findings(&mut out, &r.findings);
    out
}

/// `doctor`'s cluster-wide text: each risky or refused configuration with its fix.
pub fn risks_text(report: &crate::risks::RiskReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Release namespace: {}",
        report
            .release_namespace
            .as_deref()
            .unwrap_or("(unknown: pass --release-namespace)")
    );
    write_findings(&mut out, &report.findings);
    out
}

/// The `Findings` section: each finding with its level and fix, or `none`.
fn write_findings(out: &mut String, findings: &[crate::explain::Finding]) {
    let _ = writeln!(out, "\nFindings");
    if findings.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for f in findings {
        let level = match f.level {
            Level::Error => "ERROR",
            Level::Warning => "WARN ",
            Level::Info => "INFO ",
        };
        let _ = writeln!(out, "  {level} {}", f.message);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "        fix: {fix}");
        }
    }
}

#[cfg(test)]
mod held_tests {
    use super::held_table;
    use crate::cluster::HeldIdentity;

    #[test]
    fn held_identities_are_listed_with_their_scale_set_and_time_left() {
        assert_eq!(held_table(&[]), "", "nothing held, nothing printed");
        let far = u64::MAX / 2;
        let text = held_table(&[
            HeldIdentity {
                kind: "vmss".to_owned(),
                name: "aks-pool0-vmss".to_owned(),
                id: "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/web".to_owned(),
                since: 0,
                until: far,
            },
            HeldIdentity {
                kind: "vm".to_owned(),
                name: "node-1".to_owned(),
                id: "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/due".to_owned(),
                since: 0,
                until: 1,
            },
        ]);
        assert!(text.contains("vmss aks-pool0-vmss"), "{text}");
        assert!(text.contains("web"), "{text}");
        assert!(text.contains("vm node-1"), "{text}");
        assert!(text.contains("due (releasing)"), "{text}");
    }
}
