#include "client/client.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/format.h"
#include "common/grpc_security.h"

namespace momentum::client {
namespace {

std::shared_ptr<grpc::Channel> MakeChannel(
    const std::string& server,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  // A list of 1000 jobs with their specs can pass gRPC's default 4 MiB, but
  // the server ends a page before 4 MiB (--max-page-size and its response
  // budget): 64 MiB is ample, and a server gone wrong cannot make the
  // client take in gigabytes.
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(
      server, credentials ? credentials : grpc::InsecureChannelCredentials(),
      args);
}

}  // namespace

JobClient::JobClient(JobClientOptions options)
    : options_(std::move(options)),
      channel_(MakeChannel(options_.server, options_.credentials)),
      stub_(v1::JobService::NewStub(channel_)) {}

absl::Status JobClient::FromGrpc(const grpc::Status& status) const {
  // grpc::StatusCode and absl::StatusCode share their values.
  const auto code = static_cast<absl::StatusCode>(status.error_code());
  std::string message = status.error_message();
  if (code == absl::StatusCode::kDeadlineExceeded &&
      (message.empty() || message == "Deadline Exceeded")) {
    // gRPC's own deadline says only "Deadline Exceeded"; say who did not
    // answer in time.
    message =
        absl::StrCat("no answer from ", options_.server, " within ",
                     FormatDuration(absl::ToDoubleSeconds(options_.timeout)));
  } else if ((code == absl::StatusCode::kUnavailable ||
              code == absl::StatusCode::kDeadlineExceeded) &&
             !absl::StrContains(message, options_.server)) {
    absl::StrAppend(&message, message.empty() ? "" : " ", "(server ",
                    options_.server, ")");
  }
  return absl::Status(code, message);
}

absl::Status JobClient::WaitForConnection(absl::Time deadline) {
  grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY) {
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE ||
        state == GRPC_CHANNEL_SHUTDOWN) {
      return absl::OkStatus();
    }
    if (!channel_->WaitForStateChange(state, absl::ToChronoTime(deadline))) {
      return absl::DeadlineExceededError(absl::StrCat(
          "no connection to ", options_.server, " within ",
          FormatDuration(absl::ToDoubleSeconds(options_.timeout))));
    }
    state = channel_->GetState(/*try_to_connect=*/true);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> JobClient::SubmitJob(
    const v1::SubmitJobRequest& request) {
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  v1::SubmitJobResponse response;
  grpc::Status status = stub_->SubmitJob(&context, request, &response);
  if (!status.ok()) return FromGrpc(status);
  return std::move(*response.mutable_job());
}

absl::StatusOr<v1::Job> JobClient::GetJob(const std::string& job_id) {
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  grpc::Status status = stub_->GetJob(&context, request, &job);
  if (!status.ok()) return FromGrpc(status);
  return job;
}

absl::StatusOr<v1::ListJobsResponse> JobClient::ListJobs(
    const v1::ListJobsRequest& request) {
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  v1::ListJobsResponse response;
  grpc::Status status = stub_->ListJobs(&context, request, &response);
  if (!status.ok()) return FromGrpc(status);
  return response;
}

absl::StatusOr<v1::Job> JobClient::CancelJob(
    const v1::CancelJobRequest& request) {
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  v1::CancelJobResponse response;
  grpc::Status status = stub_->CancelJob(&context, request, &response);
  if (!status.ok()) return FromGrpc(status);
  return std::move(*response.mutable_job());
}

absl::Status JobClient::WatchJob(
    const v1::WatchJobRequest& request,
    const std::function<void(const v1::WatchJobEvent&)>& on_event) {
  absl::Status connected = WaitForConnection(absl::Now() + options_.timeout);
  if (!connected.ok()) return connected;
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  std::unique_ptr<grpc::ClientReader<v1::WatchJobEvent>> reader =
      stub_->WatchJob(&context, request);
  v1::WatchJobEvent event;
  while (reader->Read(&event)) on_event(event);
  return FromGrpc(reader->Finish());
}

absl::Status JobClient::GetJobLogs(
    const v1::GetJobLogsRequest& request,
    const std::function<void(const v1::LogLine&)>& on_line) {
  absl::Status connected = WaitForConnection(absl::Now() + options_.timeout);
  if (!connected.ok()) return connected;
  grpc::ClientContext context;
  AddToken(&context, options_.token);
  std::unique_ptr<grpc::ClientReader<v1::LogLine>> reader =
      stub_->GetJobLogs(&context, request);
  v1::LogLine line;
  while (reader->Read(&line)) on_line(line);
  return FromGrpc(reader->Finish());
}

}  // namespace momentum::client
