#include "common/file_util.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace momentum {
namespace {

using ::testing::HasSubstr;

// A fresh folder per test, removed with what the test wrote into it.
class FileUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/file_util_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr) << std::strerror(errno);
    dir_ = pattern;
  }
  void TearDown() override {
    for (const std::string& path : written_) unlink(path.c_str());
    rmdir(dir_.c_str());
  }

  // Writes `bytes` to a new file in the folder with write(2), nothing added.
  std::string Write(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    EXPECT_GE(fd, 0) << path << ": " << std::strerror(errno);
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
      EXPECT_GT(n, 0) << std::strerror(errno);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    close(fd);
    written_.push_back(path);
    return path;
  }

  std::string dir_;
  std::vector<std::string> written_;
};

TEST_F(FileUtilTest, ReadsEveryByteIncludingNulAndNoFinalNewline) {
  // 11 bytes: a NUL inside, a newline inside, a byte above 0x7f, and no
  // newline at the end.
  const std::string bytes("a\0b\nc\xff\x01zz\0q", 11);
  const std::string path = Write("bytes", bytes);
  const absl::StatusOr<std::string> text = ReadWholeFile(path);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->size(), 11u);
  EXPECT_EQ(*text, bytes);
}

TEST_F(FileUtilTest, ReadsAnEmptyFile) {
  const absl::StatusOr<std::string> text = ReadWholeFile(Write("empty", ""));
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "");
}

TEST_F(FileUtilTest, ReadsAFileOfManyReadBuffers) {
  // 300000 bytes, more than four of the reader's 64 KiB buffers and not a
  // multiple of one.
  std::string bytes(300000, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<char>((i * 7 + i / 256) % 256);
  }
  const absl::StatusOr<std::string> text = ReadWholeFile(Write("large", bytes));
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->size(), bytes.size());
  EXPECT_TRUE(*text == bytes);  // not EXPECT_EQ: no 300 kB dump on failure
}

TEST_F(FileUtilTest, MissingFileIsNotFoundNamingThePathAndTheReason) {
  const std::string path = dir_ + "/no-such-file";
  const absl::StatusOr<std::string> text = ReadWholeFile(path);
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(text.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(text.status().message()),
              HasSubstr(std::strerror(ENOENT)));
}

TEST_F(FileUtilTest, FolderIsAnErrorNamingThePathAndTheReason) {
  const absl::StatusOr<std::string> text = ReadWholeFile(dir_);
  ASSERT_FALSE(text.ok());
  EXPECT_THAT(std::string(text.status().message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(text.status().message()),
              HasSubstr(std::strerror(EISDIR)));
}

}  // namespace
}  // namespace momentum
