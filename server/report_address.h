// The address ranks report their metrics to: where they reach the
// coordinator's internal service.
#ifndef MOMENTUM_SERVER_REPORT_ADDRESS_H_
#define MOMENTUM_SERVER_REPORT_ADDRESS_H_

#include <cstdint>
#include <string>

namespace momentum::server {

// The host part of host:port ("[::1]:50051" -> "[::1]").
std::string HostOf(const std::string& address);

// host:port for ranks: `advertise` when given (a host, or host:port), else
// the host the server listens on, except that a wildcard host (0.0.0.0,
// [::], "") cannot be connected to and becomes `hostname`.
std::string ReportAddress(const std::string& listen_host, int64_t port,
                          const std::string& advertise,
                          const std::string& hostname);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_REPORT_ADDRESS_H_
