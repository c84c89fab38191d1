//! docs/configuration.md documents every flag the binaries accept: each `--flag` in `nmi --help`
//! and `mic --help` must appear in the doc's section for that binary, and every flag the doc
//! lists for a binary must be accepted by it.

use std::collections::BTreeSet;
use std::process::Command;

use podid_e2e::{binary, workspace_root};

fn help_flags(name: &str) -> anyhow::Result<BTreeSet<String>> {
    let output = Command::new(binary(name)?).arg("--help").output()?;
    anyhow::ensure!(output.status.success(), "{name} --help failed: {output:?}");
    Ok(flags_in(&String::from_utf8_lossy(&output.stdout)))
}

fn flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'-');
        if boundary
            && bytes[i] == b'-'
            && bytes[i + 1] == b'-'
            && bytes[i + 2].is_ascii_alphabetic()
        {
            let start = i + 2;
            let mut end = start;
            while end < bytes.len()
                && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'-' || bytes[end] == b'_')
            {
                end += 1;
            }
            flags.insert(text[start..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    flags
}

/// The text of `## <name>` up to the next `## ` heading.
fn section(doc: &str, name: &str) -> String {
    let heading = format!("## {name}\n");
    let Some(start) = doc.find(&heading) else {
        return String::new();
    };
    let rest = &doc[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end].to_owned()
}

fn check(name: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md"))?;
    let documented = flags_in(&section(&doc, name));
    anyhow::ensure!(
        !documented.is_empty(),
        "docs/configuration.md has no `## {name}` section with flags"
    );
    let accepted = help_flags(name)?;
    let undocumented: Vec<_> = accepted
        .iter()
        .filter(|f| !documented.contains(*f) && f.as_str() != "help")
        .collect();
    assert!(
        undocumented.is_empty(),
        "{name} flags missing from docs/configuration.md: {undocumented:?}"
    );
    // klog's flags are accepted but hidden from --help; everything else documented must exist.
    let hidden = [
        "logtostderr",
        "alsologtostderr",
        "log_dir",
        "log_file",
        "vmodule",
        "stderrthreshold",
        "v",
    ];
    let unknown: Vec<_> = documented
        .iter()
        .filter(|f| !accepted.contains(*f) && !hidden.contains(&f.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md lists {name} flags it does not accept: {unknown:?}"
    );
    Ok(())
}

#[test]
fn nmi_flags_are_documented() -> anyhow::Result<()> {
    check("nmi")
}

#[test]
fn mic_flags_are_documented() -> anyhow::Result<()> {
    check("mic")
}
