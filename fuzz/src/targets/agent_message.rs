//! `AgentMessage` as the controller reads it off an agent's stream: the
//! protobuf decode (prost), the `TryFrom` validation into domain types, and,
//! for what passes, what the controller derives next (the batch's series for
//! the exporter, rollups and alert window).

use flotilla_common::NodeId;
use flotilla_common::envelope::CommandId;
use flotilla_common::model::{ContainerReport, Inventory, TelemetryBatch};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body;
use prost::Message;

pub fn run(data: &[u8]) {
    let Ok(message) = pb::AgentMessage::decode(data) else { return };
    match message.body {
        Some(Body::Hello(hello)) => {
            let _ = NodeId::new(hello.node_id);
            if let Some(mut wire) = hello.inventory {
                let _ = wire.containers.take().map(ContainerReport::try_from);
                if let Ok(inventory) = Inventory::try_from(wire) {
                    // What the controller accepted it can send on (ListNodes) and read back.
                    let again = Inventory::try_from(pb::Inventory::from(inventory.clone()));
                    assert_eq!(
                        again.as_ref(),
                        Ok(&inventory),
                        "an accepted inventory does not survive its own encoding"
                    );
                }
            }
        }
        Some(Body::Telemetry(wire)) => {
            if let Ok(batch) = TelemetryBatch::try_from(wire) {
                let again = TelemetryBatch::try_from(pb::TelemetryBatch::from(batch.clone()));
                if let Err(e) = again {
                    panic!("an accepted batch is refused after its own encoding: {e}");
                }
                let node = NodeId::new("fuzz-node").expect("a valid node id");
                let inventory = Inventory::default();
                let _ = flotilla_controller::series::batch_samples(&node, &inventory, &batch);
            }
        }
        Some(Body::Containers(wire)) => {
            let _ = ContainerReport::try_from(wire);
        }
        Some(Body::CommandResult(result)) => {
            let _ = CommandId::from_slice(&result.command_id);
            let _ = pb::CommandStatus::try_from(result.status);
        }
        _ => {}
    }
}
