//! `vfmig ctl`: one request to a companion's control socket, its reply printed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use vfmig::companion::control::{ControlClient, Request};

use super::init_logging;

/// The arguments of `vfmig ctl`.
#[derive(clap::Args)]
pub struct Args {
    /// The companion's control socket.
    #[arg(long)]
    pub control: PathBuf,
    /// The request: a command name (`status`, `stats`, `quit`, …) or a whole JSON request
    /// such as `{"cmd":"read","gpa":4096,"len":64}`.
    pub request: String,
}

/// Sends the request and prints the reply (JSON).
pub fn run(args: Args) -> Result<()> {
    let Args { control, request } = args;
    init_logging("warn");
    let line = if request.trim_start().starts_with('{') {
        request.clone()
    } else {
        serde_json::json!({ "cmd": request.trim() }).to_string()
    };
    let cmd: Request = serde_json::from_str(&line)
        .with_context(|| format!("`{request}` is not a control request"))?;
    let reply = ControlClient::connect(&control, Duration::from_secs(5))?.call(&cmd)?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(())
}
