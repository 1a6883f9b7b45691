// The JobService as the server tests call it: a stub on one address, each
// call with a deadline, and polling for a state.
#ifndef MOMENTUM_TESTS_SERVER_TEST_JOB_CLIENT_H_
#define MOMENTUM_TESTS_SERVER_TEST_JOB_CLIENT_H_

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>

#include "momentum/v1/jobs.grpc.pb.h"
#include "tests/proc_util.h"

namespace momentum::server::testing {

class TestJobClient {
 public:
  explicit TestJobClient(const std::string& address,
                         std::shared_ptr<grpc::ChannelCredentials> credentials =
                             grpc::InsecureChannelCredentials())
      : channel_(grpc::CreateChannel(address, credentials)),
        stub_(v1::JobService::NewStub(channel_)) {}

  // A server that no longer answers fails a call after 10 s.
  grpc::Status TrySubmit(const std::string& spec, v1::Job* job) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::SubmitJobRequest request;
    request.set_spec_yaml(spec);
    v1::SubmitJobResponse response;
    grpc::Status status = stub_->SubmitJob(&ctx, request, &response);
    *job = response.job();
    return status;
  }
  v1::Job Submit(const std::string& spec) {
    v1::Job job;
    grpc::Status status = TrySubmit(spec, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }
  v1::Job Get(const std::string& id) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::GetJobRequest request;
    request.set_job_id(id);
    v1::Job job;
    grpc::Status status = stub_->GetJob(&ctx, request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }
  int32_t StoredJobs() {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::ListJobsResponse listed;
    EXPECT_TRUE(stub_->ListJobs(&ctx, v1::ListJobsRequest(), &listed).ok());
    return listed.total_size();
  }
  // Polls until the job is in `state` (true) or a minute passes (false).
  bool WaitForState(const std::string& id, v1::JobState state) {
    return momentum::testing::Eventually(
        [&] { return Get(id).state() == state; });
  }

  // Every later call carries "authorization: Bearer <token>".
  void set_token(const std::string& token) { token_ = token; }
  // A deadline of 10 s and the token, for calls made by hand.
  void Prepare(grpc::ClientContext* ctx) const {
    ctx->set_deadline(Deadline());
    if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
  }

  v1::JobService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  static std::chrono::system_clock::time_point Deadline() {
    return std::chrono::system_clock::now() + std::chrono::seconds(10);
  }
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> stub_;
  std::string token_;
};

}  // namespace momentum::server::testing

#endif  // MOMENTUM_TESTS_SERVER_TEST_JOB_CLIENT_H_
