// The gRPC faces of the coordinator: the public JobService and the
// InternalService that workers (and, later, node agents) talk to. Thin: they
// convert messages and statuses and leave the work to the Coordinator.
#ifndef MOMENTUM_SERVER_SERVICES_H_
#define MOMENTUM_SERVER_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_security.h"
#include "momentum/v1/internal.grpc.pb.h"
#include "momentum/v1/jobs.grpc.pb.h"
#include "server/coordinator.h"
#include "server/server_metrics.h"

namespace momentum::server {

// Checks the call's bearer token against `tokens` (no check when it is
// empty): UNAUTHENTICATED without a known token, PERMISSION_DENIED when its
// role may not make the call.
grpc::Status Authorize(const grpc::ServerContext* context,
                       const TokenTable& tokens, Role needed, const char* what);

// Who makes the call: the name its bearer token has in `tokens`, else the
// common name of its TLS client certificate, else "".
std::string CallerName(const grpc::ServerContext* context,
                       const TokenTable& tokens);

// Who calls JobService, as an Identity: with tokens, its token's name and
// role (UNAUTHENTICATED without a known token); without tokens, the common
// name of its TLS client certificate as a user; with neither, the server
// knows nobody (a loopback server for one person) and the caller may do
// everything, as an admin "".
grpc::Status IdentifyCaller(const grpc::ServerContext* context,
                            const TokenTable& tokens, Identity* who);

// What a JobService call does to a job.
enum class JobAccess { kSubmit, kRead, kCancel };

// The authorization matrix (docs/security.md): a user submits, and reads
// and cancels the jobs it submitted; a viewer reads every job and changes
// nothing; an admin does everything; agents and ranks use none of
// JobService. PERMISSION_DENIED names the caller, the action and the job.
grpc::Status MayAccess(const Identity& who, JobAccess access,
                       const std::string& job_id, const std::string& owner);

class JobServiceImpl final : public v1::JobService::Service {
 public:
  JobServiceImpl(Coordinator* coordinator, ServerMetrics* metrics,
                 const TokenTable* tokens)
      : coordinator_(coordinator), metrics_(metrics), tokens_(tokens) {}

  grpc::Status SubmitJob(grpc::ServerContext* context,
                         const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* context,
                      const v1::GetJobRequest* request,
                      v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context,
                        const v1::ListJobsRequest* request,
                        v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context,
                         const v1::CancelJobRequest* request,
                         v1::CancelJobResponse* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context,
                        const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::WatchJobEvent>* writer) override;
  grpc::Status GetJobLogs(grpc::ServerContext* context,
                          const v1::GetJobLogsRequest* request,
                          grpc::ServerWriter<v1::LogLine>* writer) override;

 private:
  // Identifies the caller, reads the job into `job` and checks the matrix
  // (MayAccess) for `access` to it.
  // `caller`, when not null, gets the caller's name.
  grpc::Status Access(const grpc::ServerContext* context, JobAccess access,
                      const std::string& job_id, absl::StatusOr<v1::Job>* job,
                      std::string* caller = nullptr);

  Coordinator* const coordinator_;
  ServerMetrics* const metrics_;
  const TokenTable* const tokens_;
};

class InternalServiceImpl final : public v1::InternalService::Service {
 public:
  InternalServiceImpl(Coordinator* coordinator, ServerMetrics* metrics,
                      const TokenTable* tokens)
      : coordinator_(coordinator), metrics_(metrics), tokens_(tokens) {}

  grpc::Status ReportMetrics(grpc::ServerContext* context,
                             grpc::ServerReader<v1::WorkerReport>* reader,
                             v1::WorkerReportAck* response) override;
  grpc::Status AgentSession(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::AgentCommand, v1::AgentMessage>* stream)
      override;

 private:
  // The name an agent's session goes by, reserved until the session ends:
  // the name it proved (`proven`: its token's name or certificate's common
  // name) or, when it asks for another (AgentHello.agent_id), "proven/asked"
  // -- never another agent's name. Agents sharing one token without asking
  // are told apart by a number. ALREADY_EXISTS when the name has a session.
  absl::StatusOr<std::string> ClaimAgentName(const std::string& proven,
                                             const v1::AgentHello& hello);

  Coordinator* const coordinator_;
  ServerMetrics* const metrics_;
  const TokenTable* const tokens_;
  absl::Mutex sessions_mu_;
  int64_t next_agent_ ABSL_GUARDED_BY(sessions_mu_) = 1;
  std::set<std::string> sessions_ ABSL_GUARDED_BY(sessions_mu_);
};

// absl::Status -> grpc::Status (the codes are the same canonical codes).
grpc::Status ToGrpc(const absl::Status& status);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_SERVICES_H_
