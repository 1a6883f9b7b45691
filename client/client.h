// JobClient: the calls of momentum.v1.JobService as blocking functions that
// return absl::Status, with the client's deadlines applied. The `momentum`
// CLI is its one user.
//
// Usage:
//   JobClientOptions options;
//   options.server = "127.0.0.1:50051";
//   JobClient client(options);  // does not connect yet
//   absl::StatusOr<v1::Job> job = client.GetJob("job-3");
//   if (!job.ok()) { ... job.status().code() == absl::StatusCode::kNotFound }
//
// Every failure keeps the gRPC status code (the codes share their values with
// absl::StatusCode) and its message; UNAVAILABLE and DEADLINE_EXCEEDED also
// name the server address when gRPC's message does not.
#ifndef MOMENTUM_CLIENT_CLIENT_H_
#define MOMENTUM_CLIENT_CLIENT_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "momentum/v1/jobs.grpc.pb.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::client {

struct JobClientOptions {
  // The coordinator, "host:port" or any gRPC target ("dns:///host:port",
  // "unix:/path").
  std::string server = "127.0.0.1:50051";
  // Deadline of each unary call, and how long a stream waits for the
  // connection before it gives up (a stream itself has no deadline: a watched
  // job may run for days).
  absl::Duration timeout = absl::Seconds(10);
  // Channel credentials (TLS); insecure when null.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Sent as "authorization: Bearer <token>" with every call when set.
  std::string token;
};

// Holds one channel to the coordinator. Thread-compatible: the
// channel is thread-safe, but a caller that shares a JobClient across threads
// does so for no gain; the CLI uses one thread.
class JobClient {
 public:
  explicit JobClient(JobClientOptions options);

  const std::string& server() const { return options_.server; }

  // Unary calls: block for at most the timeout (connecting included);
  // DEADLINE_EXCEEDED past it, UNAVAILABLE when the server cannot be reached,
  // otherwise the server's status.
  absl::StatusOr<::momentum::v1::Job> SubmitJob(
      const ::momentum::v1::SubmitJobRequest& request);
  absl::StatusOr<::momentum::v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<::momentum::v1::ListJobsResponse> ListJobs(
      const ::momentum::v1::ListJobsRequest& request);
  absl::StatusOr<::momentum::v1::Job> CancelJob(
      const ::momentum::v1::CancelJobRequest& request);

  // Streams: wait at most the timeout for a connection, then call `on_event`
  // (on this thread) for each message until the server ends the stream.
  // Returns the stream's final status: OK when the server ended it normally.
  absl::Status WatchJob(
      const ::momentum::v1::WatchJobRequest& request,
      const std::function<void(const ::momentum::v1::WatchJobEvent&)>&
          on_event);
  absl::Status GetJobLogs(
      const ::momentum::v1::GetJobLogsRequest& request,
      const std::function<void(const ::momentum::v1::LogLine&)>& on_line);

 private:
  // Waits until the channel is connected or has failed to connect, at most
  // until `deadline`. OK when connected, and also after a failed attempt: the
  // call that follows fails at once and carries gRPC's reason (e.g.
  // "Connection refused"). DEADLINE_EXCEEDED when still connecting at the
  // deadline (an address that does not answer).
  absl::Status WaitForConnection(absl::Time deadline);
  absl::Status FromGrpc(const grpc::Status& status) const;

  const JobClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<::momentum::v1::JobService::Stub> stub_;
};

}  // namespace momentum::client

#endif  // MOMENTUM_CLIENT_CLIENT_H_
