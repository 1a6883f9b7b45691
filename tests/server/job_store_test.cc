#include "server/job_store.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace momentum::server {
namespace {

using v1::JOB_STATE_CANCELLED;
using v1::JOB_STATE_FAILED;
using v1::JOB_STATE_PENDING;
using v1::JOB_STATE_RESTARTING;
using v1::JOB_STATE_RUNNING;
using v1::JOB_STATE_SUCCEEDED;
using v1::JOB_STATE_UNSPECIFIED;

constexpr int64_t kT0 = 1'700'000'000'000;  // an arbitrary epoch time in ms

const JobState kAllStates[] = {JOB_STATE_UNSPECIFIED, JOB_STATE_PENDING,
                               JOB_STATE_RUNNING,     JOB_STATE_RESTARTING,
                               JOB_STATE_SUCCEEDED,   JOB_STATE_FAILED,
                               JOB_STATE_CANCELLED};

// The allowed moves, written out from the header's comment.
const std::set<std::pair<JobState, JobState>> kAllowed = {
    {JOB_STATE_PENDING, JOB_STATE_RUNNING},
    {JOB_STATE_PENDING, JOB_STATE_FAILED},
    {JOB_STATE_PENDING, JOB_STATE_CANCELLED},
    {JOB_STATE_RUNNING, JOB_STATE_RESTARTING},
    {JOB_STATE_RUNNING, JOB_STATE_SUCCEEDED},
    {JOB_STATE_RUNNING, JOB_STATE_FAILED},
    {JOB_STATE_RUNNING, JOB_STATE_CANCELLED},
    {JOB_STATE_RESTARTING, JOB_STATE_RUNNING},
    {JOB_STATE_RESTARTING, JOB_STATE_FAILED},
    {JOB_STATE_RESTARTING, JOB_STATE_CANCELLED},
};

// A path of allowed moves from PENDING to `state` (empty for PENDING).
std::vector<JobState> PathTo(JobState state) {
  switch (state) {
    case JOB_STATE_PENDING:
      return {};
    case JOB_STATE_RUNNING:
      return {JOB_STATE_RUNNING};
    case JOB_STATE_RESTARTING:
      return {JOB_STATE_RUNNING, JOB_STATE_RESTARTING};
    case JOB_STATE_SUCCEEDED:
      return {JOB_STATE_RUNNING, JOB_STATE_SUCCEEDED};
    case JOB_STATE_FAILED:
      return {JOB_STATE_RUNNING, JOB_STATE_FAILED};
    case JOB_STATE_CANCELLED:
      return {JOB_STATE_CANCELLED};
    default:
      ADD_FAILURE() << "no path to " << state;
      return {};
  }
}

JobRecord MakeJob(const std::string& name, int64_t priority = 0,
                  int64_t world_size = 1) {
  JobRecord job;
  job.name = name;
  job.priority = priority;
  job.world_size = world_size;
  job.spec_yaml =
      absl::StrCat("name: ", name, "\nresources:\n  nproc: ", world_size, "\n");
  job.output_dir = absl::StrCat("/var/lib/momentum/out/", name);
  return job;
}

void ExpectSameJob(const JobRecord& actual, const JobRecord& expected) {
  EXPECT_EQ(actual.seq, expected.seq);
  EXPECT_EQ(actual.id, expected.id);
  EXPECT_EQ(actual.name, expected.name);
  EXPECT_EQ(actual.priority, expected.priority);
  EXPECT_EQ(actual.world_size, expected.world_size);
  EXPECT_EQ(actual.state, expected.state);
  EXPECT_EQ(actual.state_reason, expected.state_reason);
  EXPECT_EQ(actual.spec_yaml, expected.spec_yaml);
  EXPECT_EQ(actual.output_dir, expected.output_dir);
  EXPECT_EQ(actual.submit_ms, expected.submit_ms);
  EXPECT_EQ(actual.start_ms, expected.start_ms);
  EXPECT_EQ(actual.end_ms, expected.end_ms);
  EXPECT_EQ(actual.restarts, expected.restarts);
  EXPECT_EQ(actual.attempt, expected.attempt);
  EXPECT_EQ(actual.export_path, expected.export_path);
  EXPECT_EQ(actual.knn_top1, expected.knn_top1);
  EXPECT_EQ(actual.owner, expected.owner);
  EXPECT_EQ(actual.output_path, expected.output_path);
  EXPECT_EQ(actual.owner_is_admin, expected.owner_is_admin);
}

std::vector<std::string> Ids(const std::vector<JobRecord>& jobs) {
  std::vector<std::string> ids;
  for (const JobRecord& job : jobs) ids.push_back(job.id);
  return ids;
}

// A raw connection, for looking at the file the way another program would.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    EXPECT_EQ(
        sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr),
        SQLITE_OK);
  }
  ~RawDb() { sqlite3_close(db_); }

  void Exec(const std::string& sql) {
    char* message = nullptr;
    EXPECT_EQ(sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &message),
              SQLITE_OK)
        << sql << ": " << (message ? message : "");
    sqlite3_free(message);
  }

  // The first column of the first row, as text.
  std::string Value(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr),
              SQLITE_OK)
        << sql;
    std::string value;
    if (sqlite3_step(stmt) == SQLITE_ROW) {
      value = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    }
    sqlite3_finalize(stmt);
    return value;
  }

 private:
  sqlite3* db_ = nullptr;
};

class JobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/job_store_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/jobs.db";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<JobStore> OpenStore() {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path_);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? std::move(*store) : nullptr;
  }

  // Inserts a job at kT0 + seq and moves it along PathTo(state), the k-th
  // move at kT0 + 1000 * k with reason "move k". Returns its id.
  std::string InsertIn(JobStore& store, JobState state,
                       const std::string& name = "job") {
    absl::StatusOr<JobRecord> job = store.Insert(MakeJob(name), kT0);
    EXPECT_TRUE(job.ok()) << job.status();
    if (!job.ok()) return "";
    int k = 0;
    for (const JobState to : PathTo(state)) {
      ++k;
      absl::StatusOr<JobRecord> moved = store.Transition(
          job->id, to, absl::StrCat("move ", k), kT0 + 1000 * k);
      EXPECT_TRUE(moved.ok()) << moved.status();
    }
    return job->id;
  }

  std::string dir_;
  std::string path_;
};

TEST(JobStateTest, NamesAndFinality) {
  EXPECT_EQ(StateName(JOB_STATE_UNSPECIFIED), "UNSPECIFIED");
  EXPECT_EQ(StateName(JOB_STATE_PENDING), "PENDING");
  EXPECT_EQ(StateName(JOB_STATE_RUNNING), "RUNNING");
  EXPECT_EQ(StateName(JOB_STATE_RESTARTING), "RESTARTING");
  EXPECT_EQ(StateName(JOB_STATE_SUCCEEDED), "SUCCEEDED");
  EXPECT_EQ(StateName(JOB_STATE_FAILED), "FAILED");
  EXPECT_EQ(StateName(JOB_STATE_CANCELLED), "CANCELLED");
  EXPECT_FALSE(IsFinal(JOB_STATE_UNSPECIFIED));
  EXPECT_FALSE(IsFinal(JOB_STATE_PENDING));
  EXPECT_FALSE(IsFinal(JOB_STATE_RUNNING));
  EXPECT_FALSE(IsFinal(JOB_STATE_RESTARTING));
  EXPECT_TRUE(IsFinal(JOB_STATE_SUCCEEDED));
  EXPECT_TRUE(IsFinal(JOB_STATE_FAILED));
  EXPECT_TRUE(IsFinal(JOB_STATE_CANCELLED));
}

TEST_F(JobStoreTest, InsertRoundTripsEveryFieldAndAssignsTheStoresOwn) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  JobRecord in;
  in.name = "moco-v2 'quoted' \"name\" é";
  in.priority = -7;
  in.world_size = 4;
  in.spec_yaml = "name: x\nmoco:\n  queue: 65536\n  temperature: 0.2\n";
  in.output_dir = "/srv/momentum/out/x";
  in.restarts = 3;
  in.attempt = 2;
  in.export_path = "/srv/momentum/out/x/encoder.pt";
  in.knn_top1 = 0.8125;
  in.owner = "alice";
  in.output_path = "/srv/momentum/outputs/alice/x";
  in.owner_is_admin = true;
  // Fields Insert() assigns itself; these values must not survive.
  in.seq = 42;
  in.id = "job-42";
  in.state = JOB_STATE_SUCCEEDED;
  in.state_reason = "stale";
  in.submit_ms = 5;
  in.start_ms = 6;
  in.end_ms = 7;

  JobRecord expected = in;
  expected.seq = 1;
  expected.id = "job-1";
  expected.state = JOB_STATE_PENDING;
  expected.state_reason = "submitted";
  expected.submit_ms = kT0;
  expected.start_ms = 0;
  expected.end_ms = 0;

  absl::StatusOr<JobRecord> inserted = store->Insert(in, kT0);
  ASSERT_TRUE(inserted.ok()) << inserted.status();
  ExpectSameJob(*inserted, expected);
  absl::StatusOr<JobRecord> got = store->Get("job-1");
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameJob(*got, expected);
}

TEST_F(JobStoreTest, InsertAssignsIdsInSubmissionOrderAndRecordsTheEvent) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (int i = 1; i <= 5; ++i) {
    absl::StatusOr<JobRecord> job =
        store->Insert(MakeJob(absl::StrCat("n", i)), kT0 + i);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->seq, i);
    EXPECT_EQ(job->id, absl::StrCat("job-", i));
  }
  for (int i = 1; i <= 5; ++i) {
    const std::string id = absl::StrCat("job-", i);
    absl::StatusOr<std::vector<JobEvent>> events = store->Events(id);
    ASSERT_TRUE(events.ok()) << events.status();
    ASSERT_EQ(events->size(), 1u);
    const JobEvent& event = events->front();
    EXPECT_EQ(event.seq, i);  // one event per job so far, in job order
    EXPECT_EQ(event.job_id, id);
    EXPECT_EQ(event.time_ms, kT0 + i);
    EXPECT_EQ(event.from, JOB_STATE_UNSPECIFIED);
    EXPECT_EQ(event.to, JOB_STATE_PENDING);
    EXPECT_EQ(event.reason, "submitted");
  }
}

TEST_F(JobStoreTest, UnknownIdIsNotFoundNamingTheId) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Insert(MakeJob("a"), kT0).ok());
  const absl::Status get = store->Get("job-9").status();
  EXPECT_EQ(get.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(get.message().find("job-9"), absl::string_view::npos) << get;
  const absl::Status move =
      store->Transition("job-9", JOB_STATE_RUNNING, "x", kT0).status();
  EXPECT_EQ(move.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(move.message().find("job-9"), absl::string_view::npos) << move;
  const absl::Status events = store->Events("job-9").status();
  EXPECT_EQ(events.code(), absl::StatusCode::kNotFound);
  JobRecord run;
  run.id = "job-9";
  const absl::Status update = store->UpdateRun(run);
  EXPECT_EQ(update.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(update.message().find("job-9"), absl::string_view::npos) << update;
}

TEST_F(JobStoreTest, ListFiltersByStateSetNewestFirst) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // job-1 .. job-6 in these states.
  const JobState states[] = {JOB_STATE_PENDING,   JOB_STATE_RUNNING,
                             JOB_STATE_SUCCEEDED, JOB_STATE_RUNNING,
                             JOB_STATE_CANCELLED, JOB_STATE_RESTARTING};
  for (const JobState state : states) InsertIn(*store, state);

  int64_t total = -1;
  absl::StatusOr<std::vector<JobRecord>> jobs =
      store->List({{JOB_STATE_RUNNING, JOB_STATE_SUCCEEDED}, ""}, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-4", "job-3", "job-2"}));
  EXPECT_EQ(total, 3);

  jobs = store->List({{JOB_STATE_RESTARTING, JOB_STATE_RESTARTING}, ""}, 0, 0,
                     &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-6"}));
  EXPECT_EQ(total, 1);

  jobs = store->List({{JOB_STATE_FAILED}, ""}, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_TRUE(jobs->empty());
  EXPECT_EQ(total, 0);

  jobs = store->List({}, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-6", "job-5", "job-4",
                                                  "job-3", "job-2", "job-1"}));
  EXPECT_EQ(total, 6);
}

TEST_F(JobStoreTest, ListFiltersByOwnerWithStatesAndPages) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // job-1 .. job-5, owned alice, bob, alice, alice, "".
  for (const char* owner : {"alice", "bob", "alice", "alice", ""}) {
    JobRecord job = MakeJob("j");
    job.owner = owner;
    ASSERT_TRUE(store->Insert(job, kT0).ok());
  }
  ASSERT_TRUE(store->Transition("job-3", JOB_STATE_CANCELLED, "", kT0).ok());
  JobFilter mine;
  mine.owner = "alice";
  int64_t total = -1;
  absl::StatusOr<std::vector<JobRecord>> jobs = store->List(mine, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-4", "job-3", "job-1"}));
  EXPECT_EQ(total, 3);
  // With a state, and one page of one after skipping one.
  mine.states = {JOB_STATE_PENDING};
  jobs = store->List(mine, 1, 1, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-1"}));
  EXPECT_EQ(total, 2);
  JobFilter nobody;
  nobody.owner = "";
  jobs = store->List(nobody, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-5"}));
}

TEST_F(JobStoreTest, ListMatchesNameSubstringsLiterally) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // job-1 .. job-6. '%' and '_' are LIKE wildcards; here they must be
  // plain characters.
  const std::string names[] = {"resnet_50", "resnet150", "top%1",
                               "top21",     "Resnet",    "x"};
  for (const std::string& name : names) {
    ASSERT_TRUE(store->Insert(MakeJob(name), kT0).ok());
  }
  auto ids = [&](const std::string& text, int64_t* total) {
    absl::StatusOr<std::vector<JobRecord>> jobs =
        store->List({{}, text}, 0, 0, total);
    EXPECT_TRUE(jobs.ok()) << jobs.status();
    return jobs.ok() ? Ids(*jobs) : std::vector<std::string>{};
  };
  int64_t total = -1;
  EXPECT_EQ(ids("_", &total), (std::vector<std::string>{"job-1"}));
  EXPECT_EQ(total, 1);
  EXPECT_EQ(ids("%", &total), (std::vector<std::string>{"job-3"}));
  EXPECT_EQ(total, 1);
  EXPECT_EQ(ids("t_5", &total), (std::vector<std::string>{"job-1"}));
  EXPECT_EQ(ids("p%1", &total), (std::vector<std::string>{"job-3"}));
  EXPECT_EQ(ids("snet", &total),
            (std::vector<std::string>{"job-5", "job-2", "job-1"}));
  EXPECT_EQ(total, 3);
  EXPECT_EQ(ids("resnet", &total),
            (std::vector<std::string>{"job-2", "job-1"}));
  EXPECT_EQ(ids("nothing", &total), (std::vector<std::string>{}));
  EXPECT_EQ(total, 0);
  EXPECT_EQ(ids("", &total).size(), 6u);
  EXPECT_EQ(total, 6);

  // Name and state together.
  ASSERT_TRUE(
      store->Transition("job-2", JOB_STATE_RUNNING, "launched", kT0).ok());
  absl::StatusOr<std::vector<JobRecord>> jobs =
      store->List({{JOB_STATE_PENDING}, "resnet"}, 0, 0, &total);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-1"}));
  EXPECT_EQ(total, 1);
}

TEST_F(JobStoreTest, ListPagesWithOffsetAndLimitAndCountsAllMatches) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (int i = 1; i <= 7; ++i) {
    ASSERT_TRUE(store->Insert(MakeJob(i % 2 ? "odd" : "even"), kT0).ok());
  }
  auto page = [&](const JobFilter& filter, int64_t offset, int64_t limit) {
    int64_t total = -1;
    absl::StatusOr<std::vector<JobRecord>> jobs =
        store->List(filter, offset, limit, &total);
    EXPECT_TRUE(jobs.ok()) << jobs.status();
    return std::make_pair(jobs.ok() ? Ids(*jobs) : std::vector<std::string>{},
                          total);
  };
  using Page = std::pair<std::vector<std::string>, int64_t>;
  EXPECT_EQ(page({}, 0, 3), (Page{{"job-7", "job-6", "job-5"}, 7}));
  EXPECT_EQ(page({}, 3, 3), (Page{{"job-4", "job-3", "job-2"}, 7}));
  EXPECT_EQ(page({}, 6, 3), (Page{{"job-1"}, 7}));
  EXPECT_EQ(page({}, 7, 3), (Page{{}, 7}));
  EXPECT_EQ(page({}, 100, 0), (Page{{}, 7}));
  EXPECT_EQ(page({}, 5, 0), (Page{{"job-2", "job-1"}, 7}));
  EXPECT_EQ(page({{}, "odd"}, 1, 2), (Page{{"job-5", "job-3"}, 4}));
  EXPECT_EQ(page({{}, "even"}, 0, 10), (Page{{"job-6", "job-4", "job-2"}, 3}));

  // Without `total`.
  absl::StatusOr<std::vector<JobRecord>> jobs = store->List({}, 1, 1);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(Ids(*jobs), (std::vector<std::string>{"job-6"}));

  EXPECT_EQ(store->List({}, -1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->List({}, 0, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(JobStoreTest, PendingIsByPriorityThenSubmission) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // job-1 .. job-7 with these priorities; job-4 then starts running.
  const int64_t priorities[] = {0, 5, 0, 10, 5, -1, 5};
  for (const int64_t priority : priorities) {
    ASSERT_TRUE(store->Insert(MakeJob("p", priority), kT0).ok());
  }
  ASSERT_TRUE(
      store->Transition("job-4", JOB_STATE_RUNNING, "launched", kT0).ok());
  absl::StatusOr<std::vector<JobRecord>> pending = store->Pending();
  ASSERT_TRUE(pending.ok()) << pending.status();
  EXPECT_EQ(Ids(*pending),
            (std::vector<std::string>{"job-2", "job-5", "job-7", "job-1",
                                      "job-3", "job-6"}));
}

TEST_F(JobStoreTest, ActiveIsEveryNonFinalJobBySubmission) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  // job-1 .. job-7.
  const JobState states[] = {JOB_STATE_SUCCEEDED, JOB_STATE_RESTARTING,
                             JOB_STATE_FAILED,    JOB_STATE_PENDING,
                             JOB_STATE_CANCELLED, JOB_STATE_RUNNING,
                             JOB_STATE_PENDING};
  for (const JobState state : states) InsertIn(*store, state);
  absl::StatusOr<std::vector<JobRecord>> active = store->Active();
  ASSERT_TRUE(active.ok()) << active.status();
  EXPECT_EQ(Ids(*active),
            (std::vector<std::string>{"job-2", "job-4", "job-6", "job-7"}));
}

TEST_F(JobStoreTest, EveryAllowedTransitionSetsStateReasonTimesAndEvent) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const auto& [from, to] : kAllowed) {
    SCOPED_TRACE(StateName(from) + " -> " + StateName(to));
    const std::string id = InsertIn(*store, from);
    const std::vector<JobState> path = PathTo(from);
    const int64_t when = kT0 + 1000 * (path.size() + 1);
    // start_ms: the first move into RUNNING, if the path had one.
    int64_t start_ms = 0;
    for (size_t k = 0; k < path.size(); ++k) {
      if (path[k] == JOB_STATE_RUNNING) {
        start_ms = kT0 + 1000 * (k + 1);
        break;
      }
    }
    if (start_ms == 0 && to == JOB_STATE_RUNNING) start_ms = when;

    absl::StatusOr<JobRecord> moved =
        store->Transition(id, to, "the reason", when);
    ASSERT_TRUE(moved.ok()) << moved.status();
    absl::StatusOr<JobRecord> got = store->Get(id);
    ASSERT_TRUE(got.ok()) << got.status();
    for (const JobRecord* job : {&*moved, &*got}) {
      EXPECT_EQ(job->id, id);
      EXPECT_EQ(job->state, to);
      EXPECT_EQ(job->state_reason, "the reason");
      EXPECT_EQ(job->submit_ms, kT0);
      EXPECT_EQ(job->start_ms, start_ms);
      EXPECT_EQ(job->end_ms, IsFinal(to) ? when : 0);
    }
    absl::StatusOr<std::vector<JobEvent>> events = store->Events(id);
    ASSERT_TRUE(events.ok()) << events.status();
    // Submission, the path, this move.
    ASSERT_EQ(events->size(), path.size() + 2);
    JobState previous = JOB_STATE_UNSPECIFIED;
    for (size_t k = 0; k < events->size(); ++k) {
      const JobEvent& event = (*events)[k];
      const JobState expected_to =
          k == 0 ? JOB_STATE_PENDING : (k <= path.size() ? path[k - 1] : to);
      EXPECT_EQ(event.job_id, id);
      EXPECT_EQ(event.from, previous);
      EXPECT_EQ(event.to, expected_to);
      EXPECT_EQ(event.time_ms, k == 0 ? kT0 : kT0 + 1000 * int64_t(k));
      EXPECT_EQ(event.reason, k == 0
                                  ? "submitted"
                                  : (k <= path.size() ? absl::StrCat("move ", k)
                                                      : "the reason"));
      if (k > 0) {
        EXPECT_GT(event.seq, (*events)[k - 1].seq);
      }
      previous = expected_to;
    }
  }
}

TEST_F(JobStoreTest, StartTimeIsTheFirstEntryIntoRunningOnly) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Insert(MakeJob("r"), kT0).ok());
  const std::pair<JobState, int64_t> moves[] = {
      {JOB_STATE_RUNNING, kT0 + 10}, {JOB_STATE_RESTARTING, kT0 + 20},
      {JOB_STATE_RUNNING, kT0 + 30}, {JOB_STATE_RESTARTING, kT0 + 40},
      {JOB_STATE_RUNNING, kT0 + 50}, {JOB_STATE_SUCCEEDED, kT0 + 60}};
  for (const auto& [to, when] : moves) {
    absl::StatusOr<JobRecord> job = store->Transition("job-1", to, "m", when);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->start_ms, kT0 + 10);
    EXPECT_EQ(job->end_ms, to == JOB_STATE_SUCCEEDED ? kT0 + 60 : 0);
  }
}

TEST_F(JobStoreTest, DisallowedTransitionsFailAndChangeNothing) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const JobState from : kAllStates) {
    if (from == JOB_STATE_UNSPECIFIED) continue;  // no job is ever in it
    for (const JobState to : kAllStates) {
      if (kAllowed.count({from, to})) continue;
      SCOPED_TRACE(StateName(from) + " -> " + StateName(to));
      const std::string id = InsertIn(*store, from);
      const std::vector<JobState> path = PathTo(from);
      absl::StatusOr<JobRecord> before = store->Get(id);
      ASSERT_TRUE(before.ok()) << before.status();

      const absl::Status status =
          store->Transition(id, to, "should not stick", kT0 + 99'000).status();
      EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
      const std::string expected_message =
          IsFinal(from)
              ? absl::StrCat(id, " is ", StateName(from),
                             " (final); cannot move to ", StateName(to))
              : absl::StrCat(id, " is ", StateName(from), "; cannot move to ",
                             StateName(to));
      EXPECT_EQ(status.message(), expected_message);

      absl::StatusOr<JobRecord> after = store->Get(id);
      ASSERT_TRUE(after.ok()) << after.status();
      ExpectSameJob(*after, *before);
      EXPECT_EQ(after->state, from);
      EXPECT_EQ(after->state_reason, path.empty()
                                         ? "submitted"
                                         : absl::StrCat("move ", path.size()));
      absl::StatusOr<std::vector<JobEvent>> events = store->Events(id);
      ASSERT_TRUE(events.ok()) << events.status();
      ASSERT_EQ(events->size(), path.size() + 1);
      EXPECT_EQ(events->back().to, from);
    }
  }
}

TEST_F(JobStoreTest, UpdateRunChangesOnlyTheRunFields) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Insert(MakeJob("u", 3, 2), kT0).ok());
  ASSERT_TRUE(
      store->Transition("job-1", JOB_STATE_RUNNING, "launched", kT0 + 5).ok());

  JobRecord update = MakeJob("other name", 9, 8);
  update.id = "job-1";
  update.seq = 77;
  update.state = JOB_STATE_FAILED;
  update.state_reason = "ignored";
  update.submit_ms = 1;
  update.start_ms = 2;
  update.end_ms = 3;
  update.attempt = 2;
  update.restarts = 1;
  update.export_path = "/out/u/encoder.pt";
  update.knn_top1 = 0.625;
  ASSERT_TRUE(store->UpdateRun(update).ok());

  JobRecord expected = MakeJob("u", 3, 2);
  expected.seq = 1;
  expected.id = "job-1";
  expected.state = JOB_STATE_RUNNING;
  expected.state_reason = "launched";
  expected.submit_ms = kT0;
  expected.start_ms = kT0 + 5;
  expected.attempt = 2;
  expected.restarts = 1;
  expected.export_path = "/out/u/encoder.pt";
  expected.knn_top1 = 0.625;
  absl::StatusOr<JobRecord> got = store->Get("job-1");
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameJob(*got, expected);
  absl::StatusOr<std::vector<JobEvent>> events = store->Events("job-1");
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_EQ(events->size(), 2u);  // no event for bookkeeping
}

TEST_F(JobStoreTest, SecondStoreOnTheSameFileSeesCommittedJobs) {
  auto first = OpenStore();
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(first->Insert(MakeJob("shared", 4, 2), kT0).ok());
  {
    auto second = OpenStore();  // while the first is still open
    ASSERT_NE(second, nullptr);
    absl::StatusOr<JobRecord> job = second->Get("job-1");
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->name, "shared");
    EXPECT_EQ(job->priority, 4);
    EXPECT_EQ(job->world_size, 2);
    // And the other way round.
    ASSERT_TRUE(
        second->Transition("job-1", JOB_STATE_RUNNING, "launched", kT0 + 1)
            .ok());
  }
  absl::StatusOr<JobRecord> job = first->Get("job-1");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state, JOB_STATE_RUNNING);
  first.reset();

  auto reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  job = reopened->Get("job-1");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state, JOB_STATE_RUNNING);
  EXPECT_EQ(job->start_ms, kT0 + 1);
  // Seq continues after the reopen.
  absl::StatusOr<JobRecord> next = reopened->Insert(MakeJob("next"), kT0);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->id, "job-2");
}

TEST_F(JobStoreTest, JobSurvivesAProcessThatExitsWithoutClosing) {
  // No connection is open in this process across the fork.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path_);
    if (!store.ok()) _exit(2);
    absl::StatusOr<JobRecord> job =
        (*store)->Insert(MakeJob("orphan", 6, 3), kT0 + 123);
    if (!job.ok() || job->id != "job-1") _exit(3);
    _exit(0);  // no destructor, no sqlite3_close, no checkpoint
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFEXITED(wstatus));
  ASSERT_EQ(WEXITSTATUS(wstatus), 0);
  // The commit lives in the write-ahead log the child never checkpointed.
  std::error_code error;
  EXPECT_GT(std::filesystem::file_size(path_ + "-wal", error), 0u) << error;

  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<JobRecord> job = store->Get("job-1");
  ASSERT_TRUE(job.ok()) << job.status();
  JobRecord expected = MakeJob("orphan", 6, 3);
  expected.seq = 1;
  expected.id = "job-1";
  expected.state_reason = "submitted";
  expected.submit_ms = kT0 + 123;
  ExpectSameJob(*job, expected);
  absl::StatusOr<std::vector<JobEvent>> events = store->Events("job-1");
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_EQ(events->size(), 1u);
}

TEST_F(JobStoreTest, FileIsInWalModeWithSchemaVersionThree) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Insert(MakeJob("w"), kT0).ok());
  }
  RawDb raw(path_);
  EXPECT_EQ(raw.Value("PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw.Value("PRAGMA user_version"), "3");
  EXPECT_EQ(raw.Value("SELECT id FROM jobs WHERE seq = 1"), "job-1");
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM pragma_index_list('jobs') "
                      "WHERE name = 'jobs_by_owner'"),
            "1");
  EXPECT_EQ(raw.Value("SELECT state FROM jobs WHERE seq = 1"), "1");
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM events WHERE job_id = 'job-1'"),
            "1");
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM pragma_index_list('jobs') "
                      "WHERE name = 'jobs_by_state'"),
            "1");
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM pragma_index_list('events') "
                      "WHERE name = 'events_by_job'"),
            "1");
  EXPECT_EQ(raw.Value("SELECT \"table\" || '.' || \"to\" FROM "
                      "pragma_foreign_key_list('events')"),
            "jobs.id");
}

TEST_F(JobStoreTest, OpenNamesAMissingFolder) {
  const std::string path = dir_ + "/no-such-folder/jobs.db";
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(store.status().message().find(path), absl::string_view::npos)
      << store.status();
}

TEST_F(JobStoreTest, OpenNamesAFolderThatIsAFile) {
  std::ofstream(dir_ + "/plain") << "not a folder";
  const std::string path = dir_ + "/plain/jobs.db";
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find(path), absl::string_view::npos)
      << store.status();
}

TEST_F(JobStoreTest, OpenNamesAnUnwritableFolder) {
  if (geteuid() == 0) GTEST_SKIP() << "root may write anywhere";
  const std::string folder = dir_ + "/readonly";
  ASSERT_EQ(mkdir(folder.c_str(), 0555), 0);
  const std::string path = folder + "/jobs.db";
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find(path), absl::string_view::npos)
      << store.status();
}

TEST_F(JobStoreTest, OpenNamesAFileThatIsNotADatabase) {
  std::ofstream(path_) << std::string(4096, 'x');
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find(path_), absl::string_view::npos)
      << store.status();
}

TEST_F(JobStoreTest, OpenRefusesANewerSchema) {
  ASSERT_NE(OpenStore(), nullptr);
  RawDb(path_).Exec("PRAGMA user_version = 4");
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(store.status().message().find(path_), absl::string_view::npos)
      << store.status();
}

// A store written by the first release (schema version 1, typed out here
// as that release created it) opens with its jobs intact, no owner and no
// output path (the coordinator derives theirs as it always did).
TEST_F(JobStoreTest, OpensAVersionOneStoreAndAddsOwners) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    sqlite3_close(db);
  }
  {
    RawDb raw(path_);
    raw.Exec(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT "
        "UNIQUE, name TEXT NOT NULL, priority INTEGER NOT NULL, world_size "
        "INTEGER NOT NULL, state INTEGER NOT NULL, state_reason TEXT NOT "
        "NULL, spec_yaml TEXT NOT NULL, output_dir TEXT NOT NULL, submit_ms "
        "INTEGER NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT "
        "NULL, restarts INTEGER NOT NULL, attempt INTEGER NOT NULL, "
        "export_path TEXT NOT NULL, knn_top1 REAL NOT NULL)");
    raw.Exec(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id "
        "TEXT NOT NULL REFERENCES jobs (id), time_ms INTEGER NOT NULL, "
        "from_state INTEGER NOT NULL, to_state INTEGER NOT NULL, reason TEXT "
        "NOT NULL)");
    raw.Exec(
        "INSERT INTO jobs VALUES (1, 'job-1', 'old', 0, 2, 1, 'submitted', "
        "'name: old', '/out', 5, 0, 0, 0, 0, '', -1)");
    raw.Exec("INSERT INTO events VALUES (1, 'job-1', 5, 0, 1, 'submitted')");
    raw.Exec("PRAGMA user_version = 1");
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<JobRecord> old = store->Get("job-1");
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->name, "old");
  EXPECT_EQ(old->world_size, 2);
  EXPECT_EQ(old->owner, "");
  EXPECT_EQ(old->output_dir, "/out");
  EXPECT_EQ(old->output_path, "");
  EXPECT_FALSE(old->owner_is_admin);
  JobRecord next = MakeJob("new");
  next.owner = "bob";
  absl::StatusOr<JobRecord> inserted = store->Insert(next, kT0);
  ASSERT_TRUE(inserted.ok()) << inserted.status();
  EXPECT_EQ(inserted->id, "job-2");
  EXPECT_EQ(inserted->owner, "bob");
  EXPECT_EQ(RawDb(path_).Value("PRAGMA user_version"), "3");
}

TEST(OutputPathsOverlapTest, ComparesWholeComponents) {
  EXPECT_TRUE(OutputPathsOverlap("/o/a", "/o/a"));
  EXPECT_TRUE(OutputPathsOverlap("/o/a", "/o/a/b"));
  EXPECT_TRUE(OutputPathsOverlap("/o/a/b", "/o/a"));
  EXPECT_TRUE(OutputPathsOverlap("/", "/o/a"));
  EXPECT_FALSE(OutputPathsOverlap("/o/a", "/o/ab"));
  EXPECT_FALSE(OutputPathsOverlap("/o/ab", "/o/a"));
  EXPECT_FALSE(OutputPathsOverlap("/o/a", "/o/b"));
  EXPECT_FALSE(OutputPathsOverlap("/o/a/b", "/o/a/c"));
}

// A live job's output is its own; a finished one's is its owner's.
TEST_F(JobStoreTest, InsertRefusesAnOutputPathInUse) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto submit = [&](const std::string& owner, const std::string& path) {
    JobRecord job = MakeJob("o");
    job.owner = owner;
    job.output_path = path;
    return store->Insert(job, kT0);
  };
  ASSERT_TRUE(submit("alice", "/o/alice/run").ok());  // job-1
  const std::string rule =
      ": a job may not write into another job's output; pick another "
      "output_dir";
  absl::StatusOr<JobRecord> same = submit("alice", "/o/alice/run");
  EXPECT_EQ(same.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(same.status().message(),
            "output_dir /o/alice/run is the output of job-1 (PENDING)" + rule);
  EXPECT_EQ(submit("alice", "/o/alice/run/sub").status().message(),
            "output_dir /o/alice/run/sub lies inside the output of job-1 "
            "(PENDING)" +
                rule);
  EXPECT_EQ(
      submit("alice", "/o/alice").status().message(),
      "output_dir /o/alice contains the output of job-1 (PENDING)" + rule);
  // Nothing of the refused jobs was stored.
  int64_t total = 0;
  ASSERT_TRUE(store->List(JobFilter{}, 0, 0, &total).ok());
  EXPECT_EQ(total, 1);
  EXPECT_EQ(RawDb(path_).Value("SELECT COUNT(*) FROM events"), "1");
  // A sibling whose name starts alike is another folder.
  ASSERT_TRUE(submit("alice", "/o/alice/run2").ok());  // job-2
  // Once job-1 ended, alice may write there again (and resume from it);
  // bob never may.
  ASSERT_TRUE(
      store->Transition("job-1", JOB_STATE_CANCELLED, "test", kT0).ok());
  absl::StatusOr<JobRecord> again = submit("alice", "/o/alice/run");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id, "job-3");
  EXPECT_EQ(submit("bob", "/o/alice/run/x").status().message(),
            "output_dir /o/alice/run/x lies inside the output of job-1 "
            "(CANCELLED, submitted by alice)" +
                rule);
  // The check at launch leaves the job itself out.
  EXPECT_TRUE(store->CheckOutputFree("/o/alice/run", "alice", "job-3").ok());
  EXPECT_EQ(store->CheckOutputFree("/o/alice/run", "alice", "job-9").code(),
            absl::StatusCode::kFailedPrecondition);
}

// Only the owner's PENDING jobs count; a job that starts frees its place.
TEST_F(JobStoreTest, InsertRefusesAnOwnerWithTooManyQueuedJobs) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto submit = [&](const std::string& owner) {
    JobRecord job = MakeJob("q");
    job.owner = owner;
    return store->Insert(job, kT0, /*max_pending_per_owner=*/2);
  };
  absl::StatusOr<JobRecord> first = submit("alice");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(submit("alice").ok());
  absl::StatusOr<JobRecord> third = submit("alice");
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(third.status().message().find("alice already has 2 queued"),
            absl::string_view::npos)
      << third.status();
  // Nothing of the refused job was stored.
  int64_t total = 0;
  ASSERT_TRUE(store->List(JobFilter{}, 0, 0, &total).ok());
  EXPECT_EQ(total, 2);
  EXPECT_EQ(RawDb(path_).Value("SELECT COUNT(*) FROM events"), "2");
  // Another owner has places of its own.
  EXPECT_TRUE(submit("bob").ok());
  // Alice's first job starts: one place is free again.
  ASSERT_TRUE(
      store->Transition(first->id, JOB_STATE_RUNNING, "started", kT0 + 1).ok());
  EXPECT_TRUE(submit("alice").ok());
  EXPECT_FALSE(submit("alice").ok());
  // No limit: anything goes.
  JobRecord unlimited = MakeJob("q");
  unlimited.owner = "alice";
  EXPECT_TRUE(store->Insert(unlimited, kT0).ok());
}

// A trigger another connection adds makes the last statement of a write
// fail; the write must leave no trace.
TEST_F(JobStoreTest, WriteThatFailsHalfwayLeavesNothing) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Insert(MakeJob("kept"), kT0).ok());
  RawDb raw(path_);
  raw.Exec(
      "CREATE TRIGGER fail_events BEFORE INSERT ON events "
      "BEGIN SELECT RAISE(ABORT, 'injected failure'); END");

  const absl::Status insert = store->Insert(MakeJob("lost"), kT0 + 1).status();
  EXPECT_FALSE(insert.ok());
  EXPECT_EQ(insert.message(),
            absl::StrCat(path_, ": inserting job: injected failure"));
  const absl::Status move =
      store->Transition("job-1", JOB_STATE_RUNNING, "launched", kT0 + 2)
          .status();
  EXPECT_FALSE(move.ok());
  EXPECT_EQ(move.message(),
            absl::StrCat(path_, ": changing job state: injected failure"));

  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM jobs"), "1");
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM events"), "1");
  absl::StatusOr<JobRecord> job = store->Get("job-1");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state, JOB_STATE_PENDING);
  EXPECT_EQ(job->start_ms, 0);

  raw.Exec("DROP TRIGGER fail_events");
  // The failed insert's seq was rolled back with it.
  absl::StatusOr<JobRecord> next = store->Insert(MakeJob("next"), kT0 + 3);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->id, "job-2");
}

// Takes the busy timeout (5 s).
TEST_F(JobStoreTest, LockedDatabaseIsUnavailableNamingFileAndOperation) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  RawDb raw(path_);
  raw.Exec("BEGIN IMMEDIATE");
  const absl::Status status = store->Insert(MakeJob("blocked"), kT0).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(status.message(),
            absl::StrCat(path_, ": inserting job: database is locked"));
  raw.Exec("ROLLBACK");
  absl::StatusOr<JobRecord> job = store->Insert(MakeJob("after"), kT0);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->id, "job-1");
}

TEST_F(JobStoreTest, ConcurrentWritersEndConsistent) {
  // Two connections, so the threads contend on SQLite's lock as well as on
  // each store's mutex.
  auto a = OpenStore();
  auto b = OpenStore();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int kThreads = 6;
  constexpr int kJobsPerThread = 15;
  std::atomic<int> failures{0};
  std::vector<std::vector<std::string>> ids(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      JobStore& store = t % 2 ? *a : *b;
      for (int i = 0; i < kJobsPerThread; ++i) {
        absl::StatusOr<JobRecord> job =
            store.Insert(MakeJob(absl::StrCat("t", t)), kT0 + i);
        if (!job.ok()) {
          ++failures;
          continue;
        }
        ids[t].push_back(job->id);
        const JobState end = i % 3 == 0   ? JOB_STATE_SUCCEEDED
                             : i % 3 == 1 ? JOB_STATE_CANCELLED
                                          : JOB_STATE_RUNNING;
        if (!store.Transition(job->id, JOB_STATE_RUNNING, "go", kT0).ok()) {
          ++failures;
        }
        if (end != JOB_STATE_RUNNING &&
            !store.Transition(job->id, end, "end", kT0).ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);

  constexpr int kJobs = kThreads * kJobsPerThread;
  std::set<std::string> all;
  for (const auto& list : ids) all.insert(list.begin(), list.end());
  std::set<std::string> expected;
  for (int i = 1; i <= kJobs; ++i) expected.insert(absl::StrCat("job-", i));
  EXPECT_EQ(all, expected);

  // i % 3 == 0 for 5 of each thread's 15 jobs, and so on.
  const int64_t per_end = kThreads * kJobsPerThread / 3;
  int64_t total = -1;
  ASSERT_TRUE(a->List({{JOB_STATE_SUCCEEDED}, ""}, 0, 0, &total).ok());
  EXPECT_EQ(total, per_end);
  ASSERT_TRUE(a->List({{JOB_STATE_CANCELLED}, ""}, 0, 0, &total).ok());
  EXPECT_EQ(total, per_end);
  ASSERT_TRUE(a->List({{JOB_STATE_RUNNING}, ""}, 0, 0, &total).ok());
  EXPECT_EQ(total, per_end);
  ASSERT_TRUE(b->List({}, 0, 0, &total).ok());
  EXPECT_EQ(total, kJobs);
  ASSERT_TRUE(b->List({{}, "t3"}, 0, 0, &total).ok());
  EXPECT_EQ(total, kJobsPerThread);
  RawDb raw(path_);
  // Submission + RUNNING for all, + an end for two thirds.
  EXPECT_EQ(raw.Value("SELECT COUNT(*) FROM events"),
            std::to_string(kJobs * 2 + 2 * per_end));
}

TEST_F(JobStoreTest, ConcurrentCancelsOfOneJobSucceedOnce) {
  auto a = OpenStore();
  auto b = OpenStore();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->Insert(MakeJob("c"), kT0).ok());
  constexpr int kThreads = 8;
  std::atomic<int> ok{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      JobStore& store = t % 2 ? *a : *b;
      const absl::Status status =
          store.Transition("job-1", JOB_STATE_CANCELLED, "stop", kT0 + t)
              .status();
      if (status.ok()) ++ok;
      if (status.code() == absl::StatusCode::kFailedPrecondition) ++refused;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(ok.load(), 1);
  EXPECT_EQ(refused.load(), kThreads - 1);
  absl::StatusOr<std::vector<JobEvent>> events = a->Events("job-1");
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_EQ(events->size(), 2u);
}

}  // namespace
}  // namespace momentum::server
