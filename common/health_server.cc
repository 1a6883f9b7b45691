#include "common/health_server.h"

#include <grpcpp/health_check_service_interface.h>

#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace momentum {

absl::StatusOr<std::unique_ptr<HealthServer>> HealthServer::Start(
    const std::string& address) {
  // The default service is built per server when this is on; the main API
  // server of the same process keeps its own.
  grpc::EnableDefaultHealthCheckService(true);
  std::unique_ptr<HealthServer> health(new HealthServer);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(),
                           &health->port_);
  builder.RegisterCallbackGenericService(&health->unimplemented_);
  health->server_ = builder.BuildAndStart();
  if (health->server_ == nullptr || health->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on health address ", address));
  }
  health->SetServing(false);
  return health;
}

HealthServer::~HealthServer() {
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::seconds(1));
  }
}

void HealthServer::SetServing(bool serving) {
  if (auto* service = server_->GetHealthCheckService()) {
    service->SetServingStatus(serving);
  }
}

}  // namespace momentum
