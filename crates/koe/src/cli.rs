//! The command line: every subcommand and flag, with the help text users see.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::daemon::api::Availability;
use crate::duration::parse_duration;

/// Koe (声, "voice"): a peer-to-peer internet telephone.
#[derive(Debug, Parser)]
#[command(name = "koe", version, about, propagate_version = true)]
pub struct Cli {
    /// Profile directory holding this device's key and certificate
    /// [default: $KOE_HOME, else $XDG_DATA_HOME/koe, else ~/.local/share/koe]
    #[arg(long, global = true, env = "KOE_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug); KOE_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Reach the login server and supernodes through this HTTP proxy (CONNECT):
    /// http://[USER:PASS@]HOST:PORT [default: $HTTPS_PROXY; $NO_PROXY lists hosts reached directly]
    #[arg(long, global = true, value_name = "URL")]
    pub proxy: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole Koe network on this machine and show it working
    Demo(DemoArgs),
    /// Create and manage networks (operators)
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Run the login server (operators)
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Create an account on the network's login server
    Signup(SignupArgs),
    /// Log in: get a certificate for this device
    Login(LoginArgs),
    /// Show who this device is logged in as, renewing the certificate if due
    Whoami(WhoamiArgs),
    /// Forget this device's certificate (the device key stays)
    Logout,
    /// Change your password; certificates issued before will not renew
    Passwd(PasswdArgs),
    /// Delete your account for good
    DeleteAccount(DeleteAccountArgs),
    /// Run a supernode: part of the overlay that holds the global index and routes messages
    Node(NodeArgs),
    /// Run a relay node: a standard TURN server that carries calls for clients that cannot
    /// reach each other directly (operators)
    Relay(RelayArgs),
    /// Run the client: attach to the network, be reachable, keep history. Quiet: it says when
    /// it is online and what needs you; its log is koe.log in the profile (-v: on stderr)
    Up(UpArgs),
    /// Stop the client that `koe up` runs for this profile
    Down,
    /// Start the client at login (a systemd user unit), or stop doing so
    Autostart {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Show this client: who, status, parent supernode, known supernodes
    Status,
    /// Print what happens as it happens: calls (with the terminal bell), messages with their
    /// text, contact requests, contacts' presence, missed calls. Until Ctrl-C
    Events,
    /// Find a user's online devices
    Lookup {
        /// A username on this network: 3-32 of a-z, 0-9, '.', '-', '_', starting with a letter
        username: String,
    },
    /// Set your presence
    SetStatus {
        #[arg(value_enum)]
        status: Availability,
    },
    /// Manage contacts: add (sends a request), accept, decline, remove, list
    #[command(subcommand)]
    Contacts(ContactsCommand),
    /// Send a chat message, end-to-end encrypted
    Chat {
        /// Who to send it to (a username on this network)
        username: String,
        /// The message; several words are joined with spaces
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Show chat history, with one user or everyone (works without `koe up`)
    Messages {
        /// Only the messages with this user
        username: Option<String>,
        /// How many of the latest messages
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Call a user (rings all their devices), or a phone number through the network's PSTN
    /// gateway (SkypeOut, billed from your credit); prints ringing, answered, ended and a
    /// summary
    Call {
        /// Who to call: a username on this network, or a phone number: +81312345678, quoted
        /// with spaces or dashes ("+81 3-1234-5678"), or national (090-1234-5678) once
        /// `koe config set country JP` says where you are
        #[arg(value_name = "USER|NUMBER")]
        username: String,
        /// A WAV file sent as the microphone, in real time (silence after it ends)
        #[arg(long, value_name = "FILE.wav")]
        play: Option<PathBuf>,
        /// Record everything played out (from the answer on) to this WAV file
        #[arg(long, value_name = "FILE.wav")]
        record: Option<PathBuf>,
        /// Hang up this long after the answer [default: when someone hangs up]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Hang up once the --play file has been played ("the file ended")
        #[arg(long, requires = "play")]
        hang_up_when_played: bool,
    },
    /// Block a user: nothing from them reaches you, and they cannot leave offline messages
    Block {
        /// A username on this network
        username: String,
    },
    /// Unblock a user
    Unblock { username: String },
    /// List the users you blocked
    Blocked,
    /// Hang up the current call
    Hangup,
    /// Answer the ringing call; prints its summary when it ends
    Answer {
        /// A WAV file sent as the microphone, in real time (silence after it ends)
        #[arg(long, value_name = "FILE.wav")]
        play: Option<PathBuf>,
        /// Record everything played out to this WAV file
        #[arg(long, value_name = "FILE.wav")]
        record: Option<PathBuf>,
    },
    /// Decline the ringing call
    Decline,
    /// Mute the microphone in the call in progress (`koe mute off` to unmute)
    Mute {
        #[arg(value_enum, default_value = "on")]
        state: OnOff,
    },
    /// Press keys in the call in progress, for a phone menu (0-9, *, #, A-D)
    Dtmf { digits: String },
    /// The price of calling a phone number, and how long your credit lasts at it
    Rate {
        /// +81312345678, "+81 3-1234-5678", or national (090-1234-5678) with a country set
        number: String,
    },
    /// Your credit for calling phone numbers and its recent charges; `koe credit redeem
    /// CODE` adds a prepaid voucher
    Credit {
        #[command(subcommand)]
        action: Option<CreditCommand>,
    },
    /// Show or change your settings
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a PSTN gateway (SkypeOut) and manage its credit, vouchers and call records
    /// (operators)
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Show the call history: incoming, outgoing and missed calls (works without `koe up`)
    Calls {
        /// How many of the latest calls
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Run an echo test service like Skype's echo123 for this profile's user: answers every
    /// call with a tone, records what the caller says, plays it back and hangs up
    EchoBot {
        /// How long to listen before playing back
        #[arg(long, value_name = "DURATION", default_value = "8s", value_parser = parse_duration)]
        listen: Duration,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditCommand {
    /// Add a prepaid voucher's amount to your credit (each code works once)
    Redeem { code: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Change a setting: `country` (your home country, e.g. JP, for national phone numbers;
    /// `none` to unset)
    Set { key: ConfigKey, value: String },
    /// Show a setting
    Get { key: ConfigKey },
    /// Show every setting
    Show,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKey {
    /// Your home country (ISO 3166 code: JP, US, GB, DE…) for phone numbers in national format
    Country,
}

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Serve the PSTN gateway until interrupted: calls to phone numbers from Koe users are
    /// rated, admitted against their credit, bridged to the SIP trunks and billed. The
    /// profile (--home) must be logged in as a service account with the gateway role
    /// (`koe auth add-service-account NAME --role gateway`, then `koe login NAME`). SIGHUP
    /// reloads the rate file
    Serve(GatewayServeArgs),
    /// Manage users' credit: add a top-up, or a correction with its reason
    #[command(subcommand)]
    Credit(GatewayCreditCommand),
    /// Prepaid vouchers
    #[command(subcommand)]
    Voucher(VoucherCommand),
    /// Export call detail records as CSV
    Cdr(CdrArgs),
}

/// The gateway's ledger: the same for serving and for the operator's commands.
#[derive(Debug, Clone, Args)]
pub struct LedgerArgs {
    /// The ledger database: sqlite:PATH or postgres://USER:PASS@HOST/DB (several gateways
    /// may share one PostgreSQL ledger) [default: sqlite:HOME/ledger.db]
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// How long a write waits for a locked SQLite ledger before giving up
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub db_busy_timeout: Duration,
    /// The currency of amounts (ISO 4217)
    #[arg(long, value_name = "CODE", default_value = "JPY")]
    pub currency: String,
    /// The smallest unit a call's total is rounded up to
    #[arg(long, value_name = "AMOUNT", default_value = "0.01")]
    pub billed_unit: String,
}

#[derive(Debug, Args)]
pub struct GatewayServeArgs {
    /// The network file [default: the one saved in the profile]
    #[arg(long, value_name = "FILE")]
    pub network: Option<PathBuf>,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// A rate table (CSV: prefix,destination,price_per_minute,increment,connection_fee)
    /// [default: the built-in SkypeOut prices]
    #[arg(long, value_name = "FILE")]
    pub rates: Option<PathBuf>,
    /// A SIP trunk, tried in the order given: sip:USER:PASSWORD@HOST[:PORT][;transport=udp|tcp|tls]
    #[arg(long = "trunk", value_name = "URI", required = true)]
    pub trunks: Vec<String>,
    /// Where the SIP endpoint listens (UDP; TCP and TLS connect from its IP)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:5060")]
    pub sip_listen: SocketAddr,
    /// The address carriers should see, when the gateway is behind a NAT
    #[arg(long, value_name = "ADDR")]
    pub sip_external: Option<SocketAddr>,
    /// PEM certificates to trust for TLS trunks [default: /etc/ssl/certs/ca-certificates.crt]
    #[arg(long, value_name = "FILE")]
    pub tls_roots: Option<PathBuf>,
    /// The caller ID presented to the phone network
    #[arg(long, value_name = "NUMBER", default_value = "anonymous")]
    pub caller_id: String,
    /// Phone calls one user may have in progress at once
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_calls_per_user: u32,
    /// The most one call may cost, whatever the credit
    #[arg(long, value_name = "AMOUNT")]
    pub max_cost_per_call: Option<String>,
    /// Never call numbers starting with these digits (E.164, repeatable)
    #[arg(long = "block-prefix", value_name = "DIGITS")]
    pub blocked_prefixes: Vec<String>,
    /// A call whose carrier sends no audio this long is over
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub rtp_timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum GatewayCreditCommand {
    /// Add credit to a user's account (a top-up)
    Add {
        username: String,
        /// In the currency's units: 1000, 12.50
        amount: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// A correction or refund with its reason; never an edit of history. A negative amount
    /// takes credit back
    Adjust {
        username: String,
        #[arg(allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Show a user's balance and recent entries
    Show {
        username: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum VoucherCommand {
    /// Create prepaid vouchers and print their codes (only their hashes are stored)
    Create {
        /// What each is worth, in the currency's units
        amount: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

#[derive(Debug, Args)]
pub struct CdrArgs {
    /// Only calls started at or after this date (YYYY-MM-DD, UTC) or Unix time in seconds
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// Only this user's calls
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub ledger: LedgerArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's files instead of deleting them at the end
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a new network: keys, TLS identity and the public network.toml
    Init(NetworkInitArgs),
    /// Add a supernode address (as `koe node` prints it) to the network file's bootstrap list
    AddBootstrap {
        /// The network file to change
        #[arg(long, value_name = "FILE")]
        network: PathBuf,
        /// A multiaddr ending in /p2p/PEER_ID
        address: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContactsCommand {
    /// Send a contact request (or accept theirs, if they asked first)
    Add { username: String },
    /// Accept a contact request
    Accept { username: String },
    /// Decline a contact request
    Decline { username: String },
    /// Remove a contact
    Remove { username: String },
    /// List contacts with their presence (works without `koe up`, presence unknown)
    List,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The network file
    #[arg(long, value_name = "FILE")]
    pub network: PathBuf,
    /// TCP address to listen on
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:4100")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics over HTTP on this address (GET /metrics)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// How often to print the one-line summary
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub summary_every: Duration,
    /// Where the built-in relay node listens for TURN over UDP and TCP
    /// [default: the supernode's IP, its port + 1]
    #[arg(long, value_name = "ADDR")]
    pub relay_listen: Option<SocketAddr>,
    /// Where the built-in relay node listens for TURN over TLS [default: its port + 2]; its
    /// self-signed certificate is kept in the home (relay-tls.pem), the same across restarts
    #[arg(long, value_name = "ADDR")]
    pub relay_tls_listen: Option<SocketAddr>,
    /// Run no relay node alongside the supernode
    #[arg(long)]
    pub no_relay: bool,
    #[command(flatten)]
    pub relay: RelayLimits,
}

/// Settings a relay node shares between `koe relay` and the one inside `koe node`.
#[derive(Debug, Clone, Args)]
pub struct RelayLimits {
    /// The relay's public IP, told to clients, when it listens on 0.0.0.0 behind a 1:1 NAT
    /// [default: the listening IP, else the IP of the default route]
    #[arg(long, value_name = "IP")]
    pub relayed_ip: Option<std::net::IpAddr>,
    /// Static credentials for operators and other TURN clients (repeatable)
    #[arg(long = "relay-user", value_name = "NAME:PASSWORD")]
    pub users: Vec<String>,
    /// Allocations alive at once on the relay (0: no limit)
    #[arg(long, value_name = "N", default_value_t = RelayLimits::default().max_allocations)]
    pub max_allocations: usize,
    /// Allocations alive at once per username (0: no limit)
    #[arg(long, value_name = "N", default_value_t = RelayLimits::default().max_allocations_per_user)]
    pub max_allocations_per_user: usize,
    /// Kilobits per second one allocation may relay, both directions (0: no limit)
    #[arg(long, value_name = "KBIT/S", default_value_t = RelayLimits::default().max_kbps_per_allocation)]
    pub max_kbps_per_allocation: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self { relayed_ip: None, users: Vec::new(), max_allocations: 2000, max_allocations_per_user: 8, max_kbps_per_allocation: 512 }
    }
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Where to listen for TURN over UDP and TCP (the same port)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:3478")]
    pub listen: SocketAddr,
    /// Where to listen for TURN over TLS (a self-signed certificate kept in the profile as
    /// relay-tls.pem, the same across restarts; its fingerprint is printed)
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// File holding the secret shared with supernodes for short-lived credentials (TURN REST
    /// API); without it only --relay-user credentials work
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The TURN realm
    #[arg(long, default_value = "koe")]
    pub realm: String,
    /// How often to print the one-line summary
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub summary_every: Duration,
    #[command(flatten)]
    pub limits: RelayLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
/// A switch: `on` or `off`.
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SupernodeMode {
    /// Only a client
    Never,
    /// Serve as a supernode once up for --promote-after, if the parent confirms from outside
    /// that --node-listen is reachable, and unless --metered
    Auto,
    /// Also serve as a supernode (needs a publicly reachable --node-listen address)
    Always,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Presence to start with
    #[arg(long, value_enum, default_value = "online")]
    pub status: Availability,
    /// Run in the background: return once the client is online (or says why it is not);
    /// `koe down` stops it
    #[arg(long)]
    pub detach: bool,
    /// Serve as a supernode too
    #[arg(long, value_enum, default_value = "never")]
    pub supernode: SupernodeMode,
    /// Where the built-in supernode listens (with --supernode always or auto)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:4100")]
    pub node_listen: SocketAddr,
    /// With --supernode auto: how long to be up before offering to serve
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub promote_after: Duration,
    /// This connection is metered or on battery: never serve as a supernode under auto
    #[arg(long)]
    pub metered: bool,
    /// Answer every call at once (headless use: tests, an answering machine)
    #[arg(long)]
    pub auto_answer: bool,
    /// With --auto-answer: a WAV file sent as the microphone in answered calls
    #[arg(long, value_name = "FILE.wav")]
    pub play: Option<PathBuf>,
    /// With --auto-answer: record what each answered call plays out to this WAV file
    #[arg(long, value_name = "FILE.wav")]
    pub record: Option<PathBuf>,
    /// Make and take calls only through relay nodes: no direct path, and the other side never
    /// learns this device's address
    #[arg(long)]
    pub relay_only: bool,
}

#[derive(Debug, Args)]
pub struct NetworkInitArgs {
    /// Directory to create the network in (network.toml and secret/)
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Network name: letters a-z, digits, '.', '-' [default: the directory's name, else "koe"]
    #[arg(long)]
    pub name: Option<String>,
    /// Address the login server will listen on; also its URL unless --login-url is given
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7400")]
    pub auth_listen: SocketAddr,
    /// URL clients use to reach the login server, e.g. https://login.example.org:7400
    #[arg(long, value_name = "URL")]
    pub login_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Serve the login server's HTTPS API until interrupted (Ctrl-C or SIGTERM)
    Serve(AuthServeArgs),
    /// Create an account for a service the operator runs, under a name users cannot sign up
    /// with (e.g. echo123 for `koe echo-bot`), optionally with a role such as a PSTN gateway's;
    /// works beside a running login server
    AddServiceAccount(AddServiceAccountArgs),
}

#[derive(Debug, Args)]
pub struct AddServiceAccountArgs {
    /// The account's name, reserved ones included
    pub username: String,
    /// The network's secret directory (holds accounts.db by default)
    #[arg(long, value_name = "DIR")]
    pub secret_dir: PathBuf,
    /// Account database, as for `koe auth serve` [default: sqlite:SECRET_DIR/accounts.db]
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// What the network trusts the account with; its certificates say so
    #[arg(long, value_enum, default_value_t = AccountRole::User)]
    pub role: AccountRole,
    #[command(flatten)]
    pub password: PasswordArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccountRole {
    /// Trusted like anyone else (e.g. echo123)
    User,
    /// A PSTN gateway: clients accept its prices, balances and bills
    Gateway,
}

impl From<AccountRole> for koe_types::Role {
    fn from(role: AccountRole) -> Self {
        match role {
            AccountRole::User => Self::User,
            AccountRole::Gateway => Self::Gateway,
        }
    }
}

#[derive(Debug, Args)]
pub struct AuthServeArgs {
    /// The network file created by `koe network init`
    #[arg(long, value_name = "FILE")]
    pub network: PathBuf,
    /// The network's secret directory (signing key, TLS key and certificate)
    #[arg(long, value_name = "DIR")]
    pub secret_dir: PathBuf,
    /// Account database: sqlite:PATH (created if missing) or postgres://USER:PASS@HOST/DB
    /// [default: sqlite:SECRET_DIR/accounts.db]
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Listen address [default: the port of the network's login URL, on 127.0.0.1 if that URL
    /// is loopback, else on all interfaces]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Longest certificate lifetime handed out
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// How long a write waits for a locked SQLite database before giving up
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub db_busy_timeout: Duration,
    /// Turn off rate limiting (benchmarks and closed test networks only)
    #[arg(long)]
    pub no_rate_limits: bool,
}

#[derive(Debug, Args)]
pub struct NetworkFileArg {
    /// The network's network.toml [default: the one saved in the profile]
    #[arg(long, value_name = "FILE")]
    pub network: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PasswordArg {
    /// Read the password from the first line of stdin instead of prompting
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct SignupArgs {
    /// Username: 3-32 of a-z 0-9 . _ -, starting with a letter
    pub username: String,
    #[command(flatten)]
    pub network: NetworkFileArg,
    #[command(flatten)]
    pub password: PasswordArg,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    pub username: String,
    #[command(flatten)]
    pub network: NetworkFileArg,
    #[command(flatten)]
    pub password: PasswordArg,
    /// Ask for a certificate shorter-lived than the server's default
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct WhoamiArgs {
    /// Do not contact the login server, even if the certificate is due for renewal
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// Read the current and the new password from the first two lines of stdin
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct DeleteAccountArgs {
    #[command(flatten)]
    pub password: PasswordArg,
    /// Do not ask for confirmation
    #[arg(long)]
    pub yes: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
