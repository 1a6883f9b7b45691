#include "common/job_state.h"

#include <set>
#include <string>

#include "gtest/gtest.h"

namespace momentum {
namespace {

using v1::JobState;

// Every value of the enum, in the proto's order, written out here rather
// than taken from kJobStates.
constexpr JobState kAll[7] = {
    v1::JOB_STATE_UNSPECIFIED, v1::JOB_STATE_PENDING,   v1::JOB_STATE_RUNNING,
    v1::JOB_STATE_RESTARTING,  v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_FAILED,
    v1::JOB_STATE_CANCELLED,
};

// kMayMove[from][to], indices as in kAll, from DESIGN.md's job states:
// PENDING -> RUNNING -> (RESTARTING -> RUNNING)* -> SUCCEEDED, and FAILED or
// CANCELLED from any state that is not final.
// clang-format off
constexpr int kMayMove[7][7] = {
    //   to:  UNSP PEND RUN REST SUCC FAIL CANC
    /* UNSP */ {0,   0,   0,   0,   0,   0,   0},
    /* PEND */ {0,   0,   1,   0,   0,   1,   1},
    /* RUN  */ {0,   0,   0,   1,   1,   1,   1},
    /* REST */ {0,   0,   1,   0,   0,   1,   1},
    /* SUCC */ {0,   0,   0,   0,   0,   0,   0},
    /* FAIL */ {0,   0,   0,   0,   0,   0,   0},
    /* CANC */ {0,   0,   0,   0,   0,   0,   0},
};
// clang-format on

TEST(JobStateTest, AllowsExactlyTheMovesOfTheLifecycle) {
  int allowed = 0;
  for (int from = 0; from < 7; ++from) {
    for (int to = 0; to < 7; ++to) {
      EXPECT_EQ(IsAllowedTransition(kAll[from], kAll[to]),
                kMayMove[from][to] == 1)
          << StateName(kAll[from]) << " -> " << StateName(kAll[to]);
      allowed += kMayMove[from][to];
    }
  }
  EXPECT_EQ(allowed, 10);
}

TEST(JobStateTest, RejectsMovesOfValuesOutsideTheEnum) {
  const JobState unknown = static_cast<JobState>(42);
  for (JobState state : kAll) {
    EXPECT_FALSE(IsAllowedTransition(unknown, state)) << StateName(state);
    EXPECT_FALSE(IsAllowedTransition(state, unknown)) << StateName(state);
  }
}

TEST(JobStateTest, EveryStateHasADistinctName) {
  std::set<std::string> names;
  for (JobState state : kAll) {
    const std::string name = StateName(state);
    EXPECT_FALSE(name.empty()) << static_cast<int>(state);
    EXPECT_TRUE(names.insert(name).second) << name << " named twice";
  }
  EXPECT_EQ(names.size(), 7u);
}

TEST(JobStateTest, NamesAreTheProtoNamesWithoutThePrefix) {
  for (JobState state : kAll) {
    EXPECT_EQ("JOB_STATE_" + StateName(state), v1::JobState_Name(state));
  }
  EXPECT_EQ(StateName(static_cast<JobState>(42)), "UNSPECIFIED");
}

TEST(JobStateTest, OnlySucceededFailedAndCancelledAreFinal) {
  const std::set<JobState> final_states = {
      v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED};
  for (JobState state : kAll) {
    EXPECT_EQ(IsFinal(state), final_states.count(state) == 1)
        << StateName(state);
  }
}

TEST(JobStateTest, LifecycleListsEveryStateButUnspecifiedInOrder) {
  ASSERT_EQ(kJobStates.size(), 6u);
  for (size_t i = 0; i < kJobStates.size(); ++i) {
    EXPECT_EQ(kJobStates[i], kAll[i + 1]);
  }
}

TEST(JobStateTest, ParsesEveryNameBackInAnyCaseWithOrWithoutPrefix) {
  for (int i = 1; i < 7; ++i) {
    const std::string name = StateName(kAll[i]);
    std::string lower;
    for (char c : name) lower.push_back(static_cast<char>(c - 'A' + 'a'));
    EXPECT_EQ(ParseState(name), kAll[i]) << name;
    EXPECT_EQ(ParseState(lower), kAll[i]) << lower;
    EXPECT_EQ(ParseState(" job_state_" + lower + "\t"), kAll[i]) << name;
  }
  EXPECT_EQ(ParseState("canceled"), v1::JOB_STATE_CANCELLED);
}

TEST(JobStateTest, ParsesNoOtherText) {
  EXPECT_EQ(ParseState("UNSPECIFIED"), std::nullopt);
  EXPECT_EQ(ParseState("JOB_STATE_UNSPECIFIED"), std::nullopt);
  EXPECT_EQ(ParseState(""), std::nullopt);
  EXPECT_EQ(ParseState("   "), std::nullopt);
  EXPECT_EQ(ParseState("JOB_STATE_"), std::nullopt);
  EXPECT_EQ(ParseState("run"), std::nullopt);
  EXPECT_EQ(ParseState("running x"), std::nullopt);
  EXPECT_EQ(ParseState("STATE_RUNNING"), std::nullopt);
  EXPECT_EQ(ParseState("2"), std::nullopt);
}

}  // namespace
}  // namespace momentum
