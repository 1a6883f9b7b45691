// libFuzzer target: the API request path up to the validator, as
// momentum-server takes it: bytes of a SubmitJobRequest decoded by
// protobuf, then its spec and overrides through the job-spec validator.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "common/job_spec.h"
#include "google/protobuf/stubs/logging.h"
#include "momentum/v1/jobs.pb.h"

// Invalid UTF-8 in a string field is a refusal, not news: keep protobuf's
// log quiet.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  momentum::v1::SubmitJobRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  std::vector<std::string> overrides(request.overrides().begin(),
                                     request.overrides().end());
  absl::StatusOr<momentum::JobSpec> spec =
      momentum::ParseJobSpec(request.spec_yaml(), overrides, "spec");
  if (!spec.ok() &&
      spec.status().code() != absl::StatusCode::kInvalidArgument) {
    std::abort();
  }
  return 0;
}
