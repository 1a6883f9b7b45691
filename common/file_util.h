// Reading a whole file, in one place for the server, the client, the worker
// and the tests. No LibTorch, no gRPC.
//
// Usage:
//   absl::StatusOr<std::string> text = ReadWholeFile(path);
//   if (!text.ok()) return text.status();  // "cannot read PATH: REASON"
#ifndef MOMENTUM_COMMON_FILE_UTIL_H_
#define MOMENTUM_COMMON_FILE_UTIL_H_

#include <string>

#include "absl/status/statusor.h"

namespace momentum {

// The bytes of `path`, exactly (binary: '\0' and a missing final newline
// are kept). Blocks until the file is read. On failure the status names the
// file and the reason, "cannot read PATH: <errno text>", with the code of
// the errno (absl::ErrnoToStatus): NOT_FOUND for a missing file,
// PERMISSION_DENIED for one it may not read.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_FILE_UTIL_H_
