//! Removes network namespaces, veths and slot files left behind by dead test processes.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let report = podid_netsim::sweep().context("netsim-sweep")?;
    if report.is_empty() {
        println!("netsim-sweep: nothing left over");
    } else {
        println!(
            "netsim-sweep: removed slots {:?}, namespaces {:?}, links {:?}",
            report.slots, report.namespaces, report.links
        );
    }
    Ok(())
}
