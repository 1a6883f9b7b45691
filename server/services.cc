#include "server/services.h"

#include <chrono>
#include <map>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/job_id.h"
#include "server/agent_launcher.h"
#include "server/internal_dispatch.h"

namespace momentum::server {
namespace {

using SteadyClock = std::chrono::steady_clock;

// Counts and times one RPC for /metrics when it goes out of scope.
class RpcRecord {
 public:
  RpcRecord(ServerMetrics* metrics, const char* method)
      : metrics_(metrics), method_(method), start_(SteadyClock::now()) {}
  ~RpcRecord() {
    if (metrics_ == nullptr) return;
    metrics_->OnRpc(
        method_, CodeName(code_),
        std::chrono::duration<double>(SteadyClock::now() - start_).count());
  }
  grpc::Status Done(grpc::Status status) {
    code_ = status.error_code();
    return status;
  }

 private:
  static std::string CodeName(grpc::StatusCode code) {
    return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  }
  ServerMetrics* const metrics_;
  const char* const method_;
  const SteadyClock::time_point start_;
  grpc::StatusCode code_ = grpc::StatusCode::OK;
};

}  // namespace

namespace {

// The call's "authorization: Bearer TOKEN" token; "" when there is none.
std::string BearerToken(const grpc::ServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return "";
  const std::string value(it->second.data(), it->second.size());
  const std::string prefix = "Bearer ";
  if (value.rfind(prefix, 0) != 0) return "";
  return value.substr(prefix.size());
}

// The identity of the call's bearer token in `tokens` (not empty).
grpc::Status TokenIdentity(const grpc::ServerContext* context,
                           const TokenTable& tokens, Identity* who) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing bearer token (authorization metadata)");
  }
  const std::string token = BearerToken(context);
  if (token.empty()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "the authorization metadata is not \"Bearer TOKEN\"");
  }
  std::optional<Identity> found = tokens.Find(token);
  if (!found) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown token");
  }
  *who = *found;
  return grpc::Status::OK;
}

}  // namespace

grpc::Status Authorize(const grpc::ServerContext* context,
                       const TokenTable& tokens, Role needed,
                       const char* what) {
  if (tokens.empty()) return grpc::Status::OK;
  Identity who;
  if (grpc::Status status = TokenIdentity(context, tokens, &who);
      !status.ok()) {
    return status;
  }
  if (who.role != needed && who.role != Role::kAdmin) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat(who.name, " may not ", what));
  }
  return grpc::Status::OK;
}

std::string CallerName(const grpc::ServerContext* context,
                       const TokenTable& tokens) {
  if (!tokens.empty()) {
    if (std::optional<Identity> who = tokens.Find(BearerToken(context))) {
      return who->name;
    }
  }
  if (auto auth = context->auth_context(); auth != nullptr) {
    const std::vector<grpc::string_ref> names =
        auth->FindPropertyValues("x509_common_name");
    if (!names.empty()) return std::string(names[0].data(), names[0].size());
  }
  return "";
}

grpc::Status IdentifyCaller(const grpc::ServerContext* context,
                            const TokenTable& tokens, Identity* who) {
  if (!tokens.empty()) return TokenIdentity(context, tokens, who);
  who->name = CallerName(context, tokens);
  who->role = who->name.empty() ? Role::kAdmin : Role::kUser;
  return grpc::Status::OK;
}

grpc::Status MayAccess(const Identity& who, JobAccess access,
                       const std::string& job_id, const std::string& owner) {
  bool allowed = false;
  switch (who.role) {
    case Role::kAdmin:
      allowed = true;
      break;
    case Role::kViewer:
      allowed = access == JobAccess::kRead;
      break;
    case Role::kUser:
      allowed = access == JobAccess::kSubmit || who.name == owner;
      break;
    case Role::kAgent:
      allowed = false;
      break;
  }
  if (allowed) return grpc::Status::OK;
  const char* what = access == JobAccess::kSubmit ? "submit jobs"
                     : access == JobAccess::kRead ? "read"
                                                  : "cancel";
  if (access == JobAccess::kSubmit || job_id.empty()) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat(who.name, " may not ", what));
  }
  return grpc::Status(
      grpc::StatusCode::PERMISSION_DENIED,
      absl::StrCat(who.name, " may not ", what, " ", job_id, " (submitted by ",
                   owner.empty() ? "nobody known" : owner, ")"));
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

grpc::Status JobServiceImpl::Access(const grpc::ServerContext* context,
                                    JobAccess access, const std::string& job_id,
                                    absl::StatusOr<v1::Job>* job,
                                    std::string* caller) {
  Identity who;
  if (grpc::Status denied = IdentifyCaller(context, *tokens_, &who);
      !denied.ok()) {
    return denied;
  }
  if (caller != nullptr) *caller = who.name;
  // Agents are refused before the job is looked up.
  if (who.role == Role::kAgent) {
    return MayAccess(who, access, "", "");
  }
  *job = coordinator_->GetJob(job_id);
  if (!job->ok()) return ToGrpc(job->status());
  return MayAccess(who, access, job_id, (*job)->owner());
}

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext* context,
                                       const v1::SubmitJobRequest* request,
                                       v1::SubmitJobResponse* response) {
  RpcRecord rpc(metrics_, "SubmitJob");
  Identity who;
  if (grpc::Status denied = IdentifyCaller(context, *tokens_, &who);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  if (grpc::Status denied = MayAccess(who, JobAccess::kSubmit, "", "");
      !denied.ok()) {
    return rpc.Done(denied);
  }
  std::vector<std::string> overrides(request->overrides().begin(),
                                     request->overrides().end());
  absl::StatusOr<v1::Job> job = coordinator_->Submit(
      request->spec_yaml(), overrides, who.name, who.role == Role::kAdmin);
  if (!job.ok()) return rpc.Done(ToGrpc(job.status()));
  *response->mutable_job() = *std::move(job);
  return rpc.Done(grpc::Status::OK);
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* context,
                                    const v1::GetJobRequest* request,
                                    v1::Job* response) {
  RpcRecord rpc(metrics_, "GetJob");
  absl::StatusOr<v1::Job> job;
  if (grpc::Status denied =
          Access(context, JobAccess::kRead, request->job_id(), &job);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  *response = *std::move(job);
  return rpc.Done(grpc::Status::OK);
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* context,
                                      const v1::ListJobsRequest* request,
                                      v1::ListJobsResponse* response) {
  RpcRecord rpc(metrics_, "ListJobs");
  Identity who;
  if (grpc::Status denied = IdentifyCaller(context, *tokens_, &who);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  if (who.role == Role::kAgent) {
    return rpc.Done(MayAccess(who, JobAccess::kRead, "", ""));
  }
  // A user lists the jobs it submitted; viewers and admins all of them.
  std::optional<std::string> owner;
  if (who.role == Role::kUser) owner = who.name;
  absl::StatusOr<v1::ListJobsResponse> list =
      coordinator_->ListJobs(*request, owner);
  if (!list.ok()) return rpc.Done(ToGrpc(list.status()));
  *response = *std::move(list);
  return rpc.Done(grpc::Status::OK);
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* context,
                                       const v1::CancelJobRequest* request,
                                       v1::CancelJobResponse* response) {
  RpcRecord rpc(metrics_, "CancelJob");
  absl::StatusOr<v1::Job> job;
  if (grpc::Status denied =
          Access(context, JobAccess::kCancel, request->job_id(), &job);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  job = coordinator_->Cancel(request->job_id(), request->reason());
  if (!job.ok()) return rpc.Done(ToGrpc(job.status()));
  *response->mutable_job() = *std::move(job);
  return rpc.Done(grpc::Status::OK);
}

grpc::Status JobServiceImpl::WatchJob(
    grpc::ServerContext* context, const v1::WatchJobRequest* request,
    grpc::ServerWriter<v1::WatchJobEvent>* writer) {
  RpcRecord rpc(metrics_, "WatchJob");
  absl::StatusOr<v1::Job> job;
  std::string caller;
  if (grpc::Status denied =
          Access(context, JobAccess::kRead, request->job_id(), &job, &caller);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  absl::StatusOr<std::shared_ptr<Subscription>> subscription =
      coordinator_->Watch(request->job_id(), request->metrics(),
                          request->logs(), caller);
  if (!subscription.ok()) return rpc.Done(ToGrpc(subscription.status()));
  grpc::Status status = grpc::Status::OK;
  while (true) {
    if (context->IsCancelled()) {
      status = grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      break;
    }
    v1::WatchJobEvent event;
    if ((*subscription)->Next(&event, std::chrono::milliseconds(200))) {
      if (!writer->Write(event)) break;
    } else if ((*subscription)->Done()) {
      break;
    }
  }
  coordinator_->Unwatch(*subscription);
  return rpc.Done(status);
}

grpc::Status JobServiceImpl::GetJobLogs(
    grpc::ServerContext* context, const v1::GetJobLogsRequest* request,
    grpc::ServerWriter<v1::LogLine>* writer) {
  RpcRecord rpc(metrics_, "GetJobLogs");
  absl::StatusOr<v1::Job> job;
  std::string caller;
  if (grpc::Status denied =
          Access(context, JobAccess::kRead, request->job_id(), &job, &caller);
      !denied.ok()) {
    return rpc.Done(denied);
  }
  // Following: subscribed before the stored lines are read, so no line falls
  // in between; lines already sent are skipped by number.
  std::shared_ptr<Subscription> subscription;
  if (request->follow()) {
    absl::StatusOr<std::shared_ptr<Subscription>> s =
        coordinator_->Watch(request->job_id(), false, true, caller);
    if (!s.ok()) return rpc.Done(ToGrpc(s.status()));
    subscription = *s;
  }
  absl::StatusOr<std::vector<v1::LogLine>> stored = coordinator_->ReadLogs(
      request->job_id(), request->rank(), request->from_line());
  if (!stored.ok()) {
    if (subscription) coordinator_->Unwatch(subscription);
    return rpc.Done(ToGrpc(stored.status()));
  }
  std::map<int32_t, int64_t> sent;  // rank -> last line number sent
  for (const v1::LogLine& line : *stored) {
    if (!writer->Write(line)) break;
    sent[line.rank()] = line.line_number();
  }
  if (subscription) {
    while (!context->IsCancelled()) {
      v1::WatchJobEvent event;
      if (subscription->Next(&event, std::chrono::milliseconds(200))) {
        if (!event.has_log()) continue;
        const v1::LogLine& line = event.log();
        if (request->rank() >= 0 && line.rank() != request->rank()) continue;
        if (line.line_number() < request->from_line()) continue;
        auto it = sent.find(line.rank());
        if (it != sent.end() && line.line_number() <= it->second) continue;
        if (!writer->Write(line)) break;
        sent[line.rank()] = line.line_number();
      } else if (subscription->Done()) {
        break;
      }
    }
    coordinator_->Unwatch(subscription);
  }
  return rpc.Done(grpc::Status::OK);
}

grpc::Status InternalServiceImpl::ReportMetrics(
    grpc::ServerContext* context, grpc::ServerReader<v1::WorkerReport>* reader,
    v1::WorkerReportAck*) {
  RpcRecord rpc(metrics_, "ReportMetrics");
  // Only a rank's own credential, issued for this launch, may report; with
  // or without a token file.
  const std::string token = BearerToken(context);
  std::optional<RankKey> key = coordinator_->RankOf(token);
  if (!key) {
    // A known token of the file (a user's, an agent's) is refused as such.
    if (!tokens_->empty() && tokens_->Find(token)) {
      return rpc.Done(grpc::Status(
          grpc::StatusCode::PERMISSION_DENIED,
          absl::StrCat(tokens_->Find(token)->name,
                       " may not report metrics: only a rank's own "
                       "credential may")));
    }
    return rpc.Done(grpc::Status(
        grpc::StatusCode::UNAUTHENTICATED,
        token.empty()
            ? "reporting metrics needs the rank's credential (bearer token)"
            : "unknown or revoked rank credential"));
  }
  v1::WorkerReport report;
  if (!reader->Read(&report)) return rpc.Done(grpc::Status::OK);
  if (!report.has_hello()) {
    return rpc.Done(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "the first report must be a WorkerHello"));
  }
  const v1::WorkerHello hello = report.hello();
  if (!IsJobId(hello.job_id())) {
    return rpc.Done(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("WorkerHello.job_id must be job-<n>, got \"",
                     absl::CHexEscape(hello.job_id().substr(0, 64)), "\"")));
  }
  if (absl::Status s =
          MayReportAs(*key, hello.job_id(), hello.attempt(), hello.rank());
      !s.ok()) {
    return rpc.Done(ToGrpc(s));
  }
  while (reader->Read(&report)) {
    // The hello was checked against the credential (MayReportAs).
    DispatchWorkerReport(hello, report, *coordinator_);
  }
  return rpc.Done(grpc::Status::OK);
}

absl::StatusOr<std::string> InternalServiceImpl::ClaimAgentName(
    const std::string& proven, const v1::AgentHello& hello) {
  // Its length and characters are checked (CheckAgentHello).
  const std::string& asked = hello.agent_id();
  absl::MutexLock lock(&sessions_mu_);
  std::string id;
  if (proven.empty()) {
    // Nobody is known: the agent's word, or a number.
    id = asked.empty() ? absl::StrCat("agent-", next_agent_++) : asked;
  } else if (asked.empty() || asked == proven) {
    // The proven name; agents that share one token (a pool) are numbered.
    id = proven;
    if (asked.empty() && sessions_.count(id) > 0) {
      id = absl::StrCat(proven, "/", next_agent_++);
    }
  } else {
    // An agent may name itself, always under the name it proved.
    id = absl::StrCat(proven, "/", asked);
  }
  if (!sessions_.insert(id).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("agent ", id,
                     " already has a session with this coordinator; one "
                     "session per agent"));
  }
  return id;
}

grpc::Status InternalServiceImpl::AgentSession(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::AgentCommand, v1::AgentMessage>* stream) {
  RpcRecord rpc(metrics_, "AgentSession");
  if (grpc::Status denied =
          Authorize(context, *tokens_, Role::kAgent, "run an agent session");
      !denied.ok()) {
    return rpc.Done(denied);
  }
  // Who the agent proved to be: its token's name, else its certificate's
  // common name; "" on a server that knows nobody.
  const std::string proven = CallerName(context, *tokens_);
  v1::AgentMessage message;
  if (!stream->Read(&message)) return rpc.Done(grpc::Status::OK);
  if (!message.has_hello()) {
    return rpc.Done(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "the first message must be an AgentHello"));
  }
  const v1::AgentHello hello = message.hello();
  if (absl::Status s = CheckAgentHello(hello); !s.ok()) {
    return rpc.Done(ToGrpc(s));
  }
  const std::vector<int> gpus(hello.gpus().begin(), hello.gpus().end());
  absl::StatusOr<std::string> claimed = ClaimAgentName(proven, hello);
  if (!claimed.ok()) return rpc.Done(ToGrpc(claimed.status()));
  const std::string id = *claimed;
  struct Release {
    InternalServiceImpl* self;
    std::string id;
    ~Release() {
      absl::MutexLock lock(&self->sessions_mu_);
      self->sessions_.erase(id);
    }
  } release{this, id};
  auto launcher = std::make_shared<AgentLauncher>(
      id, hello.hostname(), hello.advertise_address(), hello.slots(), gpus);
  v1::AgentCommand welcome;
  welcome.set_welcome_agent_id(id);
  if (!stream->Write(welcome)) return rpc.Done(grpc::Status::OK);

  // Commands go out on a thread of their own; this one reads.
  std::thread writer([&] {
    v1::AgentCommand command;
    while (!launcher->closed() && !context->IsCancelled()) {
      if (launcher->NextCommand(&command, std::chrono::milliseconds(200)) &&
          !stream->Write(command)) {
        break;
      }
    }
  });
  coordinator_->AddLauncher(launcher);
  while (stream->Read(&message)) {
    DispatchAgentMessage(message, *launcher, *coordinator_);
  }
  launcher->Close();
  writer.join();
  coordinator_->RemoveLauncher(launcher.get());
  return rpc.Done(grpc::Status::OK);
}

}  // namespace momentum::server
