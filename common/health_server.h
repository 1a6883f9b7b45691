// A plaintext gRPC server that answers only grpc.health.v1.Health, for
// Kubernetes' gRPC probes: the kubelet cannot present our client
// certificates or tokens, so the probe port carries nothing but the status.
#ifndef MOMENTUM_COMMON_HEALTH_SERVER_H_
#define MOMENTUM_COMMON_HEALTH_SERVER_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace momentum {

class HealthServer {
 public:
  // Listens on `address` (host:port; port 0 picks a free one). Starts
  // NOT_SERVING until SetServing(true).
  static absl::StatusOr<std::unique_ptr<HealthServer>> Start(
      const std::string& address);
  ~HealthServer();

  // The overall status ("" service), as probes ask for it.
  void SetServing(bool serving);
  int port() const { return port_; }

 private:
  HealthServer() = default;
  // Answers every other method UNIMPLEMENTED; it also makes this a callback
  // server, which gRPC requires of a server without services of its own.
  grpc::CallbackGenericService unimplemented_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace momentum

#endif  // MOMENTUM_COMMON_HEALTH_SERVER_H_
