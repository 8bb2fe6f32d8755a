//! `tandem-edge inbox`: list the prompts partners sent to this user, then answer or decline
//! each one.
//!
//! Who decides, per waiting prompt, in this order:
//! 1. A prompt the profile cannot fill (a field it lacks, a template that does not compile)
//!    is never accepted: it is reported with the reason, and left waiting (the user may add
//!    the field and run again) or, with `--decline-others`, declined.
//! 2. Partners in the profile's `auto_accept_partners`, partners given with `--auto-accept`,
//!    and every partner under `--yes`, are accepted.
//! 3. Otherwise, when stdin is a terminal, the user is asked: `y` accepts, `n` declines,
//!    anything else (or end of input) skips.
//! 4. What is neither accepted nor declined stays waiting, unless `--decline-others` is
//!    given, which declines it.
//!
//! An accepted prompt is answered at once: its output streams to stdout under a
//! `[n] partner:` line, the one-line summary goes to stderr, and `--show-transparency`
//! prints the record after it. A prompt that stopped waiting meanwhile (`404`/`409`) is
//! reported and passed over. An unknown or revoked device token (`401`) stops everything.
//! Ctrl-C cancels the running answer (counted as failed: the cloud may have spent the
//! ticket) and leaves the prompts after it waiting.
//!
//! The exit code is non-zero when an answer failed or an inbox call failed (other than the
//! prompt no longer waiting); [`InboxReport`] has the counts.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tandem_protocol::DoneReason;

use super::{drive, summary, ModelArgs};
use crate::client::{ClientConfig, EdgeClient};
use crate::inbox::{
    ApiCode, AutoAccept, Decision, InboxConfig, InboxError, InboxItem, ItemStatus, PromptContext,
};
use crate::prompt::{Profile, PromptError};
use crate::sanitize::Sanitizer;
use crate::transport::ServerList;
use crate::EdgeBundle;

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The server's REST root, `http://HOST:PORT` (https is not supported yet).
    #[arg(long, value_name = "URL")]
    pub api: String,
    /// The user's profile (a JSON object; `auto_accept_partners` lists trusted partners).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Answer this partner's prompts without asking (repeatable; exact name).
    #[arg(long = "auto-accept", value_name = "PARTNER")]
    pub auto_accept: Vec<String>,
    /// Answer every prompt the profile can fill, without asking.
    #[arg(long)]
    pub yes: bool,
    /// Decline every prompt that is not answered, instead of leaving it waiting.
    #[arg(long)]
    pub decline_others: bool,
    /// Only list the waiting prompts.
    #[arg(long, conflicts_with_all = ["yes", "decline_others", "auto_accept"])]
    pub list: bool,
    /// Print what each answer used and what left the device after its output.
    #[arg(long)]
    pub show_transparency: bool,
}

/// Where `inbox` writes and whom it asks.
pub struct Console<'a> {
    /// The listing and the answers' text.
    pub out: &'a mut (dyn Write + Send),
    /// Status lines and questions.
    pub err: &'a mut (dyn Write + Send),
    /// The user's answers, a line each; `None` when nobody can be asked (stdin is not a
    /// terminal).
    pub answers: Option<&'a mut (dyn BufRead + Send)>,
}

/// What one `inbox` run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboxReport {
    /// Prompts listed.
    pub waiting: usize,
    /// Accepted and answered to the end.
    pub answered: usize,
    pub declined: usize,
    /// Left waiting (not decided, or not fillable without `--decline-others`).
    pub left_waiting: usize,
    /// Accepted or declined elsewhere, expired or cancelled before this run got to them.
    pub gone: usize,
    /// Answers or inbox calls that failed.
    pub failed: usize,
}

/// What to do with one item.
enum Action {
    Answer,
    Decline,
    Leave,
}

/// Runs `tandem-edge inbox`.
pub async fn inbox(args: InboxArgs, mut console: Console<'_>) -> anyhow::Result<InboxReport> {
    // Settings first: a bad URL should not wait for the model to load.
    let token = args
        .model
        .device_token
        .clone()
        .context("the inbox needs the device token (--device-token or TANDEM_DEVICE_TOKEN)")?;
    let mut inbox_cfg = InboxConfig::new(&args.api, token)?;
    if let Some(path) = &args.model.ca_cert {
        let cas = crate::tls::read_ca_file(path).map_err(anyhow::Error::msg)?;
        inbox_cfg = inbox_cfg.with_ca_certs(&cas)?;
    }
    let bundle = args.model.load()?;
    let profile = match &args.profile {
        Some(p) => Profile::from_file(p)?,
        None => Profile::default(),
    };
    let sanitizer = Sanitizer::default();
    let ctx = PromptContext::from_bundle(&bundle, &profile, &sanitizer)?;
    let cfg = if args.list {
        // Listing runs no generation, so it needs no --server.
        ClientConfig::new(ServerList::new(Vec::new()))
    } else {
        args.model.client_config()?
    };
    let cfg = cfg.with_inbox(inbox_cfg);
    let client = EdgeClient::from_bundle(&bundle, cfg)?;

    let listed = client.inbox().await.context("cannot read the inbox")?;
    // The server lists pending prompts only; anything else cannot be accepted anyway.
    let items: Vec<&InboxItem> = listed
        .items
        .iter()
        .filter(|item| item.status == ItemStatus::Pending)
        .collect();
    let checks: Vec<Result<(), PromptError>> = items
        .iter()
        .map(|item| item.prompt.assemble(&ctx).map(drop))
        .collect();
    list(&mut console, &listed.user_id, &items, &checks)?;
    let report = InboxReport {
        waiting: items.len(),
        left_waiting: if args.list { items.len() } else { 0 },
        ..InboxReport::default()
    };
    if args.list {
        return Ok(report);
    }

    let mut policy = if args.yes {
        AutoAccept::everyone()
    } else {
        AutoAccept::from_profile(&profile)
    };
    for partner in &args.auto_accept {
        policy = policy.with_partner(partner.clone());
    }
    let mut answering = Answering {
        client: &client,
        ctx,
        bundle: &bundle,
        args: &args,
        console,
        report,
    };
    answering.all(&items, &checks, &policy).await?;
    let r = answering.report;
    writeln!(
        answering.console.err,
        "inbox: {} answered, {} declined, {} left waiting, {} no longer waiting, {} failed",
        r.answered, r.declined, r.left_waiting, r.gone, r.failed
    )?;
    Ok(r)
}

/// Prints the waiting prompts: who asks, until when, the template and the fields it reads.
fn list(
    console: &mut Console<'_>,
    user: &str,
    items: &[&InboxItem],
    checks: &[Result<(), PromptError>],
) -> anyhow::Result<()> {
    let out = &mut *console.out;
    if items.is_empty() {
        writeln!(out, "No prompts waiting for {user}.")?;
        return Ok(());
    }
    let s = if items.len() == 1 { "" } else { "s" };
    writeln!(out, "{} prompt{s} waiting for {user}:", items.len())?;
    for (i, (item, check)) in items.iter().zip(checks).enumerate() {
        let p = &item.prompt;
        writeln!(
            out,
            "[{}] {} (prompt {}, expires {}, up to {} tokens)",
            i + 1,
            p.partner,
            item.prompt_id,
            p.expires,
            p.max_tokens
        )?;
        for line in p.template.lines() {
            writeln!(out, "    | {line}")?;
        }
        if let Ok(t) = p.compile() {
            let fields: Vec<String> = t.referenced_fields().into_iter().collect();
            if !fields.is_empty() {
                writeln!(out, "    reads from your profile: {}", fields.join(", "))?;
            }
        }
        if let Err(e) = check {
            writeln!(out, "    cannot be answered: {e}")?;
        }
    }
    Ok(())
}

/// The state of the answering loop.
struct Answering<'a, 'c> {
    client: &'a EdgeClient,
    ctx: PromptContext<'a>,
    bundle: &'a EdgeBundle,
    args: &'a InboxArgs,
    console: Console<'c>,
    report: InboxReport,
}

impl Answering<'_, '_> {
    /// Decides about and handles every item, in order (see the module doc).
    async fn all(
        &mut self,
        items: &[&InboxItem],
        checks: &[Result<(), PromptError>],
        policy: &AutoAccept,
    ) -> anyhow::Result<()> {
        for (i, (item, check)) in items.iter().zip(checks).enumerate() {
            let n = i + 1;
            let (action, why) = match check {
                Err(_) => (Action::Leave, "cannot be answered with this profile"),
                Ok(()) => match policy.decide(item) {
                    Decision::Accept => (Action::Answer, ""),
                    Decision::Ask if self.console.answers.is_none() => (
                        Action::Leave,
                        "nobody to ask; see --auto-accept, --yes and --decline-others",
                    ),
                    Decision::Ask => (self.ask(n, item)?, "skipped"),
                },
            };
            let action = match action {
                Action::Leave if self.args.decline_others => Action::Decline,
                other => other,
            };
            let go_on = match action {
                Action::Answer => self.answer(n, item).await?,
                Action::Decline => self.decline(n, item).await?,
                Action::Leave => {
                    writeln!(self.console.err, "[{n}] left waiting: {why}")?;
                    self.report.left_waiting += 1;
                    true
                }
            };
            if !go_on {
                self.report.left_waiting += items.len() - n;
                break;
            }
        }
        Ok(())
    }

    /// Asks the user about item `n`; `Leave` when nobody can be asked.
    fn ask(&mut self, n: usize, item: &InboxItem) -> anyhow::Result<Action> {
        let Some(answers) = self.console.answers.as_deref_mut() else {
            return Ok(Action::Leave);
        };
        loop {
            write!(
                self.console.err,
                "Answer [{n}] from {}? [y]es / [n]o, decline / [s]kip: ",
                item.prompt.partner
            )?;
            self.console.err.flush()?;
            let mut line = String::new();
            if answers.read_line(&mut line)? == 0 {
                writeln!(self.console.err)?;
                return Ok(Action::Leave);
            }
            match line.trim().to_ascii_lowercase().as_str() {
                "y" | "yes" => return Ok(Action::Answer),
                "n" | "no" => return Ok(Action::Decline),
                "" | "s" | "skip" => return Ok(Action::Leave),
                _ => writeln!(self.console.err, "please answer y, n or s")?,
            }
        }
    }

    /// Accepts and answers item `n`. `Ok(false)`: stop (the user cancelled).
    async fn answer(&mut self, n: usize, item: &InboxItem) -> anyhow::Result<bool> {
        let partner = &item.prompt.partner;
        let accepted = match self.client.accept(&item.prompt_id).await {
            Ok(a) => a,
            Err(e) => {
                self.inbox_call_failed(n, "accept", e)?;
                return Ok(true);
            }
        };
        let req = match accepted.request(&self.ctx, self.client.model_info()) {
            Ok(req) => req,
            Err(e) => {
                // The listing's check passed, so the accepted prompt differs from the listed
                // one; the ticket is spent either way.
                writeln!(self.console.err, "[{n}] cannot prepare the answer: {e}")?;
                self.report.failed += 1;
                return Ok(true);
            }
        };
        write!(self.console.err, "[{n}] answering {partner}: ")?;
        self.args
            .model
            .describe(self.console.err, &req, self.bundle)?;
        writeln!(self.console.out, "[{n}] {partner}:")?;
        let result = match self.client.generate(req) {
            Ok(generation) => {
                drive(generation, Some(&mut *self.console.out), self.console.err).await
            }
            Err(e) => Err(anyhow::Error::new(e).context("the generation could not start")),
        };
        writeln!(self.console.out)?;
        let finished = match result {
            Ok(f) => f,
            Err(e) => {
                writeln!(self.console.err, "[{n}] failed: {e:#}")?;
                self.report.failed += 1;
                return Ok(true);
            }
        };
        writeln!(self.console.err, "[{n}] {}", summary(&finished))?;
        if self.args.show_transparency {
            if let Some(r) = &finished.record {
                writeln!(self.console.out, "\n{}", r.render_text())?;
            }
        }
        if finished.reason == DoneReason::Cancelled {
            self.report.failed += 1;
            return Ok(false);
        }
        self.report.answered += 1;
        Ok(true)
    }

    async fn decline(&mut self, n: usize, item: &InboxItem) -> anyhow::Result<bool> {
        match self.client.decline(&item.prompt_id).await {
            Ok(()) => {
                writeln!(
                    self.console.err,
                    "[{n}] declined {}'s prompt",
                    item.prompt.partner
                )?;
                self.report.declined += 1;
            }
            Err(e) => self.inbox_call_failed(n, "decline", e)?,
        }
        Ok(true)
    }

    /// Counts a failed accept or decline; a rejected token ends the run.
    fn inbox_call_failed(&mut self, n: usize, what: &str, e: InboxError) -> anyhow::Result<()> {
        match e.api_code() {
            Some(ApiCode::Unauthorized | ApiCode::TokenStale) => {
                return Err(anyhow::Error::new(e).context(format!("cannot {what} prompt [{n}]")))
            }
            Some(ApiCode::NotFound | ApiCode::Conflict) => {
                writeln!(self.console.err, "[{n}] no longer waiting: {e}")?;
                self.report.gone += 1;
            }
            _ => {
                writeln!(self.console.err, "[{n}] cannot {what}: {e}")?;
                self.report.failed += 1;
            }
        }
        Ok(())
    }
}
