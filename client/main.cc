// momentum: the command-line client of a Momentum coordinator. Parses the
// flags, builds a JobClient and runs one command (client/commands.h); see
// docs/client.md.
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/commands.h"
#include "client/format.h"
#include "common/grpc_security.h"

namespace {

using ::momentum::client::kExitOk;
using ::momentum::client::kExitUsage;

std::string DefaultServer() {
  const char* env = std::getenv("MOMENTUM_SERVER");
  return env != nullptr && *env != '\0' ? env : "127.0.0.1:50051";
}

int TerminalWidth() {
  winsize size{};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) {
    return size.ws_col;
  }
  return 0;
}

// Checks a --state value; the command converts it with ParseState after.
const CLI::Validator kStateName(
    [](std::string& text) -> std::string {
      if (::momentum::client::ParseState(text)) return "";
      return "unknown job state \"" + text + "\" (one of " +
             ::momentum::client::StateNamesForHelp() + ")";
    },
    "");

const CLI::Validator kOverride(
    [](std::string& text) -> std::string {
      const size_t eq = text.find('=');
      if (eq != std::string::npos && eq > 0) return "";
      return "override \"" + text + "\" is not dotted.key=value";
    },
    "");

// Makes a repeatable option take one value per occurrence, so that
// `--set a=1 job.yaml` leaves job.yaml to the positional argument.
CLI::Option* OnePerFlag(CLI::Option* option) {
  return option->allow_extra_args(false);
}

}  // namespace

int main(int argc, char** argv) {
  namespace client = ::momentum::client;

  CLI::App app{
      "momentum: submit MoCo training jobs to a Momentum coordinator and "
      "follow them.",
      "momentum"};
  app.require_subcommand(1);
  app.footer(
      "Exit codes: 0 success; 1 a call failed, a file could not be read, or a "
      "watched job ended FAILED or CANCELLED; 2 usage error. See "
      "docs/client.md.");
  // Global flags may also come after the command: `momentum list --server X`.
  app.fallthrough();

  client::JobClientOptions client_options;
  client_options.server = DefaultServer();
  std::string output = "table";
  double timeout_seconds = 10;
  app.add_option("--server", client_options.server,
                 "coordinator address host:port (default: $MOMENTUM_SERVER, "
                 "else 127.0.0.1:50051)")
      ->type_name("ADDR");
  app.add_option("--output", output, "output format: table or json")
      ->check(CLI::IsMember({"table", "json"}))
      ->type_name("FORMAT")
      ->capture_default_str();
  momentum::TlsFiles tls;
  std::string token_file;
  app.add_option("--tls-ca", tls.ca,
                 "CA of the server's certificate: use TLS (default: "
                 "$MOMENTUM_TLS_CA)")
      ->type_name("FILE");
  app.add_option("--tls-cert", tls.cert,
                 "client certificate for mutual TLS (default: "
                 "$MOMENTUM_TLS_CERT)")
      ->type_name("FILE");
  app.add_option("--tls-key", tls.key,
                 "its private key (default: $MOMENTUM_TLS_KEY)")
      ->type_name("FILE");
  app.add_option("--token-file", token_file,
                 "file with the bearer token (default: $MOMENTUM_TOKEN, else "
                 "the file $MOMENTUM_TOKEN_FILE)")
      ->type_name("FILE");
  app.add_option("--timeout", timeout_seconds,
                 "deadline of each call, and of connecting, in seconds")
      ->check(CLI::PositiveNumber)
      ->type_name("SECONDS")
      ->capture_default_str();

  client::SubmitOptions submit;
  CLI::App* submit_cmd = app.add_subcommand(
      "submit", "submit a job spec; prints the new job's id");
  submit_cmd->add_option("FILE", submit.file, "job spec (YAML)")
      ->required()
      ->type_name("PATH");
  OnePerFlag(submit_cmd->add_option(
                 "--set", submit.overrides,
                 "override a spec field, dotted.key=value (repeatable)"))
      ->check(kOverride)
      ->type_name("KEY=VALUE");
  submit_cmd->add_flag("--wait", submit.wait,
                       "then watch the job until it ends");

  client::ListOptions list;
  std::vector<std::string> list_states;
  CLI::App* list_cmd = app.add_subcommand("list", "list jobs, newest first");
  OnePerFlag(list_cmd->add_option("--state", list_states,
                                  "only jobs in this state (repeatable): " +
                                      client::StateNamesForHelp()))
      ->check(kStateName)
      ->type_name("STATE");
  list_cmd
      ->add_option("--name", list.name_contains,
                   "only jobs whose name contains TEXT")
      ->type_name("TEXT");
  list_cmd
      ->add_option("--limit", list.limit,
                   "jobs per page, 1 to 1000 (default: the server's, 50)")
      ->check(CLI::Range(1, 1000))
      ->type_name("N");
  list_cmd->add_flag("--all-pages", list.all_pages,
                     "fetch every page, not only the first");

  client::GetOptions get;
  CLI::App* get_cmd = app.add_subcommand("get", "show every field of a job");
  get_cmd->add_option("JOB", get.job_id, "job id, e.g. job-3")
      ->required()
      ->type_name("ID");
  get_cmd->add_flag("--spec", get.spec, "also print the resolved job spec");

  std::string watch_job;
  CLI::App* watch_cmd =
      app.add_subcommand("watch", "follow a job's progress until it ends");
  watch_cmd->add_option("JOB", watch_job, "job id")
      ->required()
      ->type_name("ID");

  client::CancelOptions cancel;
  CLI::App* cancel_cmd = app.add_subcommand("cancel", "stop a job");
  cancel_cmd->add_option("JOB", cancel.job_id, "job id")
      ->required()
      ->type_name("ID");
  cancel_cmd
      ->add_option("--reason", cancel.reason, "recorded as the state reason")
      ->type_name("TEXT");

  client::LogsOptions logs;
  CLI::App* logs_cmd =
      app.add_subcommand("logs", "print the output of a job's ranks");
  logs_cmd->add_option("JOB", logs.job_id, "job id")
      ->required()
      ->type_name("ID");
  logs_cmd->add_flag("-f,--follow", logs.follow,
                     "keep printing new lines until the job ends");
  logs_cmd->add_option("--rank", logs.rank, "only this rank's lines, raw")
      ->check(CLI::NonNegativeNumber)
      ->type_name("R");
  logs_cmd
      ->add_option("--from-line", logs.from_line,
                   "skip each rank's lines before line N (from 1)")
      ->check(CLI::NonNegativeNumber)
      ->type_name("N");

  for (CLI::App* command : app.get_subcommands({})) {
    command->footer(
        "--server, --output and --timeout (momentum --help) may also come "
        "after the command.");
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    // --help prints and exits 0; every other parse error is a usage error,
    // whatever CLI11's own code for it.
    return app.exit(error) == 0 ? kExitOk : kExitUsage;
  }
  for (const std::string& name : list_states) {
    list.states.push_back(*client::ParseState(name));
  }
  client_options.timeout = absl::Seconds(timeout_seconds);
  auto credentials =
      momentum::ClientCredentials(momentum::ClientTlsFromEnv(tls));
  if (!credentials.ok()) {
    std::cerr << "momentum: " << credentials.status().message() << "\n";
    return kExitUsage;
  }
  client_options.credentials = *credentials;
  auto token = momentum::ClientToken(token_file);
  if (!token.ok()) {
    std::cerr << "momentum: " << token.status().message() << "\n";
    return kExitUsage;
  }
  client_options.token = *token;

  client::JobClient job_client(client_options);
  client::CommandContext context{job_client,
                                 output == "json"
                                     ? client::OutputFormat::kJson
                                     : client::OutputFormat::kTable,
                                 std::cout, std::cerr};
  context.terminal = isatty(STDOUT_FILENO) != 0;
  context.terminal_width = context.terminal ? TerminalWidth() : 0;

  if (submit_cmd->parsed()) return client::RunSubmit(context, submit);
  if (list_cmd->parsed()) return client::RunList(context, list);
  if (get_cmd->parsed()) return client::RunGet(context, get);
  if (watch_cmd->parsed()) return client::RunWatch(context, watch_job);
  if (cancel_cmd->parsed()) return client::RunCancel(context, cancel);
  if (logs_cmd->parsed()) return client::RunLogs(context, logs);
  // require_subcommand(1) leaves no other way out of parse().
  std::abort();
}
