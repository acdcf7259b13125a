//! `flotctl sim inject`: faults for simulated GPUs, through the Fleet API.

use flotilla_common::model::SimFault;
use flotilla_proto::pb;

use crate::UsageError;
use crate::cli::SimCmd;
use crate::client::{call, connect};
use crate::context::Connection;

pub async fn run(cmd: SimCmd, conn: &Connection) -> anyhow::Result<()> {
    let SimCmd::Inject { node, fault, gpu } = cmd;
    // Check locally first so a typo never needs a round trip.
    let fault: SimFault = fault.parse().map_err(UsageError)?;
    let mut client = connect(conn).await?;
    let resp = call(
        &format!("inject {fault} into {node}"),
        client.inject_fault(pb::InjectFaultRequest { node_id: node, fault: fault.to_string(), gpu }).await,
    )?;
    println!("{}", resp.message);
    Ok(())
}
