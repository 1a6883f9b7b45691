#include "common/status_macros.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace momentum {
namespace {

absl::Status Fails() { return absl::NotFoundError("gone"); }

absl::StatusOr<int> Half(int value) {
  if (value % 2 != 0) return absl::InvalidArgumentError("odd");
  return value / 2;
}

absl::StatusOr<std::unique_ptr<int>> Boxed(int value) {
  return std::make_unique<int>(value);
}

absl::Status ReturnIfError(const absl::Status& status, int* reached) {
  MOMENTUM_RETURN_IF_ERROR(status);
  ++*reached;
  return absl::OkStatus();
}

absl::StatusOr<int> Quarter(int value) {
  MOMENTUM_ASSIGN_OR_RETURN(const int half, Half(value));
  MOMENTUM_ASSIGN_OR_RETURN(const int quarter, Half(half));
  return quarter;
}

TEST(StatusMacrosTest, ReturnIfErrorPassesOkThrough) {
  int reached = 0;
  EXPECT_TRUE(ReturnIfError(absl::OkStatus(), &reached).ok());
  EXPECT_EQ(reached, 1);
}

TEST(StatusMacrosTest, ReturnIfErrorReturnsTheErrorUnchanged) {
  int reached = 0;
  const absl::Status status = ReturnIfError(Fails(), &reached);
  EXPECT_EQ(status, absl::NotFoundError("gone"));
  EXPECT_EQ(reached, 0);
}

TEST(StatusMacrosTest, ReturnIfErrorTakesAStatusOrInAStatusOrFunction) {
  auto run = [](int value) -> absl::StatusOr<std::string> {
    MOMENTUM_RETURN_IF_ERROR(Half(value));
    return std::string("even");
  };
  EXPECT_EQ(run(4).value(), "even");
  EXPECT_EQ(run(3).status(), absl::InvalidArgumentError("odd"));
}

TEST(StatusMacrosTest, AssignOrReturnChainsValuesAndStopsAtTheFirstError) {
  EXPECT_EQ(Quarter(12).value(), 3);
  EXPECT_EQ(Quarter(6).status(), absl::InvalidArgumentError("odd"));
  EXPECT_EQ(Quarter(5).status(), absl::InvalidArgumentError("odd"));
}

TEST(StatusMacrosTest, AssignOrReturnMovesIntoAnExistingVariable) {
  auto run = [](int value) -> absl::Status {
    std::unique_ptr<int> box;
    MOMENTUM_ASSIGN_OR_RETURN(box, Boxed(value));
    return *box == value ? absl::OkStatus() : absl::InternalError("lost");
  };
  EXPECT_TRUE(run(7).ok());
}

}  // namespace
}  // namespace momentum
