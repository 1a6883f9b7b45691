#include "worker/cpu_affinity.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace momentum::worker {
namespace {

TEST(CpuShareTest, ContiguousSlicesInRankOrderLargerFirst) {
  const std::vector<int> seven = {0, 1, 2, 3, 4, 5, 6};
  EXPECT_EQ(CpuShare(seven, 0, 3), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(CpuShare(seven, 1, 3), (std::vector<int>{3, 4}));
  EXPECT_EQ(CpuShare(seven, 2, 3), (std::vector<int>{5, 6}));
  EXPECT_EQ(CpuShare(seven, 0, 1), seven);
  // The CPUs a container's cpuset leaves, with gaps.
  const std::vector<int> gaps = {2, 3, 8, 9, 12, 13};
  EXPECT_EQ(CpuShare(gaps, 0, 2), (std::vector<int>{2, 3, 8}));
  EXPECT_EQ(CpuShare(gaps, 1, 2), (std::vector<int>{9, 12, 13}));
  EXPECT_EQ(CpuShare(gaps, 5, 6), (std::vector<int>{13}));
  // Fewer CPUs than ranks, or a rank out of range: no share.
  EXPECT_TRUE(CpuShare({0}, 0, 2).empty());
  EXPECT_TRUE(CpuShare(seven, 3, 3).empty());
  EXPECT_TRUE(CpuShare(seven, -1, 3).empty());
  EXPECT_TRUE(CpuShare(seven, 0, 0).empty());
}

TEST(CpuListStringTest, RangesAsTheKernelWritesThem) {
  EXPECT_EQ(CpuListString({}), "");
  EXPECT_EQ(CpuListString({5}), "5");
  EXPECT_EQ(CpuListString({0, 1, 2, 3}), "0-3");
  EXPECT_EQ(CpuListString({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(CpuListString({1, 3}), "1,3");
}

TEST(ParseCpuListTest, ListsAndRangesAndTheirErrors) {
  EXPECT_EQ(*ParseCpuList("3", "X"), std::vector<int>{3});
  EXPECT_EQ(*ParseCpuList("0-3,8,10-11", "X"),
            (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(*ParseCpuList("5,1-2,2", "X"), (std::vector<int>{1, 2, 5}));
  for (const std::string bad :
       {"", ",", "1,", "a", "-1", "3-1", "1-", "1-2-3", " 1", "8192", "1+2"}) {
    const auto r = ParseCpuList(bad, "MOMENTUM_CPUS");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(r.status().message(),
              "MOMENTUM_CPUS must be CPU numbers and ranges like 0-3,8 (CPUs 0 "
              "to 8191), got \"" +
                  bad + "\"");
  }
  // Round trip with the list writer.
  const std::vector<int> cpus = {0, 2, 3, 4, 9};
  EXPECT_EQ(*ParseCpuList(CpuListString(cpus), "X"), cpus);
}

// Cpus_allowed_list of a thread of this process, from /proc.
std::string AllowedList(pid_t tid) {
  std::ifstream status("/proc/self/task/" + std::to_string(tid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Cpus_allowed_list:", 0) == 0) {
      return line.substr(line.find_first_not_of(" \t", 18));
    }
  }
  return "";
}

TEST(BindProcessTest, BindsThreadsAlreadyRunningAndThoseStartedLater) {
  auto allowed = AllowedCpus();
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  ASSERT_FALSE(allowed->empty());
  // A thread started before the call.
  std::atomic<bool> stop{false};
  std::atomic<pid_t> early_tid{0};
  std::thread early([&] {
    early_tid = gettid();
    while (!stop) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (early_tid == 0) std::this_thread::yield();

  const int one = allowed->back();
  ASSERT_TRUE(BindProcess({one}).ok());
  const std::string expected = std::to_string(one);
  EXPECT_EQ(AllowedList(gettid()), expected);
  EXPECT_EQ(AllowedList(early_tid), expected);
  std::vector<int> late_cpus;
  std::thread late(
      [&] { late_cpus = AllowedCpus().value_or(std::vector<int>{}); });
  late.join();
  EXPECT_EQ(late_cpus, std::vector<int>{one});
  stop = true;
  early.join();

  EXPECT_EQ(BindProcess({}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BindProcess({-1}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(BindProcess(*allowed).ok());  // as it was
  EXPECT_EQ(*AllowedCpus(), *allowed);
}

}  // namespace
}  // namespace momentum::worker
