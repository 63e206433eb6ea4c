//! `flotilla exec` through the hub: the CLI's stream is joined to a stream the hub opens on
//! the link of the replica's node, so the node needs no inbound connection (it may sit behind
//! a NAT). The hub checks the request, finds the node, and then copies bytes both ways
//! without reading them ([`proto::exec`] chunks); the agent runs the command and enforces the
//! limits. Either side going away ends both: the CLI's loss resets the agent's stream, which
//! kills the command.

use proto::messages::{ExecSpec, HubRequest, StreamStart};
use transport::frame;

use crate::api::{StreamError, locate};
use crate::cluster::Shared;

/// How starting an exec ended.
pub(crate) enum Started {
    /// The agent runs the command; these are the hub's streams to it.
    Running((quinn::SendStream, quinn::RecvStream)),
    /// Refused, by the hub or the agent; the CLI has been told why.
    Refused(String),
}

impl Started {
    /// What the audit log records.
    pub(crate) fn outcome(&self) -> String {
        match self {
            Started::Running(_) => "ok: started".into(),
            Started::Refused(why) => format!("failed: {why}"),
        }
    }
}

/// Checks `spec`, asks the replica's node to run it and passes the agent's answer (or the
/// hub's refusal) to the CLI as the stream's [`StreamStart`].
pub(crate) async fn start(
    shared: &Shared,
    spec: ExecSpec,
    send: &mut quinn::SendStream,
) -> Result<Started, StreamError> {
    let refuse = |why: String| (StreamStart::Error { message: why.clone() }, Started::Refused(why));
    let (answer, started) = match spec.check() {
        Err(why) => refuse(why.to_string()),
        Ok(()) => match locate(shared, &spec.replica, None).await {
            Err(e) => refuse(e.to_string()),
            Ok(Err(why)) => refuse(why.to_string()),
            Ok(Ok(located)) => {
                // The node's link can end under the request (the agent restarting, its session
                // replaced by a newer one): the CLI is told so, not left with a closed stream.
                let replica = spec.replica.clone();
                let asked = async {
                    let (mut agent_send, mut agent_recv) = located.conn.open_bi().await?;
                    frame::write(&mut agent_send, &HubRequest::Exec(spec)).await?;
                    let answer = frame::read::<StreamStart>(&mut agent_recv).await?;
                    Ok::<_, StreamError>((answer, agent_send, agent_recv))
                };
                match asked.await {
                    Ok((Some(StreamStart::Ok), agent_send, agent_recv)) => {
                        (StreamStart::Ok, Started::Running((agent_send, agent_recv)))
                    }
                    Ok((Some(StreamStart::Error { message }), ..)) => refuse(message),
                    Ok((None, ..)) => refuse("the agent closed the exec stream (is it older than exec?)".into()),
                    Err(e) => refuse(format!(
                        "the link to {replica}'s node ended before the command started ({e}); if the agent is reconnecting, try again"
                    )),
                }
            }
        },
    };
    frame::write(send, &answer).await?;
    Ok(started)
}

/// Copies the CLI's input to the agent and the agent's output to the CLI until the agent
/// finishes (the command ended), either side fails, or the CLI's connection `client` ends
/// (a quiet command with no input left would not notice that otherwise); then both agent
/// streams are closed, which kills the command if it still runs.
pub(crate) async fn relay(
    client: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    (mut agent_send, mut agent_recv): (quinn::SendStream, quinn::RecvStream),
) {
    let mut finished = false;
    {
        let up = async {
            if tokio::io::copy(recv, &mut agent_send).await.is_ok() {
                // The CLI has no more input; the command runs on until it ends.
                let _ = agent_send.finish();
                std::future::pending::<()>().await;
            }
        };
        let down = tokio::io::copy(&mut agent_recv, send);
        tokio::select! {
            r = down => finished = r.is_ok(),
            () = up => {}
            _ = client.closed() => {}
        }
    }
    if !finished {
        let _ = agent_send.reset(0u32.into());
        let _ = agent_recv.stop(0u32.into());
    }
}
