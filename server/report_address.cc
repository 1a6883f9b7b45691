#include "server/report_address.h"

#include "absl/strings/str_cat.h"

namespace momentum::server {

std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  // A bare IPv6 address ("::1") has colons but no port.
  if (address.find(']') == std::string::npos && address.find(':') != colon) {
    return address;
  }
  return address.substr(0, colon);
}

std::string ReportAddress(const std::string& listen_host, int64_t port,
                          const std::string& advertise,
                          const std::string& hostname) {
  if (!advertise.empty()) {
    const bool has_port = advertise.back() != ']' &&
                          advertise.rfind(':') != std::string::npos &&
                          HostOf(advertise) != advertise;
    return has_port ? advertise : absl::StrCat(advertise, ":", port);
  }
  const bool wildcard = listen_host.empty() || listen_host == "0.0.0.0" ||
                        listen_host == "[::]" || listen_host == "::" ||
                        listen_host == "[::0]";
  return absl::StrCat(wildcard ? hostname : listen_host, ":", port);
}

}  // namespace momentum::server
