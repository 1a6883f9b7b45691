#include "server/job_store.h"

#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"

namespace momentum::server {

namespace {

// The version of the schema below, kept in PRAGMA user_version. A file with a
// newer version was written by a newer coordinator: refuse it rather than
// guess.
constexpr int kSchemaVersion = 3;

// SQLite waits this long for another connection's write lock before it gives
// up with "database is locked". Writes are a few statements each, so a
// longer wait means something is wrong with the other writer.
constexpr int kBusyTimeoutMs = 5000;

constexpr const char* kSchema[] = {
    "CREATE TABLE IF NOT EXISTS jobs ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    // NULL only between the INSERT and the UPDATE of Insert()'s
    // transaction, which no reader ever sees.
    "  id TEXT UNIQUE,"
    "  name TEXT NOT NULL,"
    "  priority INTEGER NOT NULL,"
    "  world_size INTEGER NOT NULL,"
    "  state INTEGER NOT NULL,"
    "  state_reason TEXT NOT NULL,"
    "  spec_yaml TEXT NOT NULL,"
    "  output_dir TEXT NOT NULL,"
    "  submit_ms INTEGER NOT NULL,"
    "  start_ms INTEGER NOT NULL,"
    "  end_ms INTEGER NOT NULL,"
    "  restarts INTEGER NOT NULL,"
    "  attempt INTEGER NOT NULL,"
    "  export_path TEXT NOT NULL,"
    "  knn_top1 REAL NOT NULL)",
    // Pending() reads it in this order; List() and Active() filter by state.
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority DESC, "
    "seq)",
    "CREATE TABLE IF NOT EXISTS events ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  job_id TEXT NOT NULL REFERENCES jobs (id),"
    "  time_ms INTEGER NOT NULL,"
    "  from_state INTEGER NOT NULL,"
    "  to_state INTEGER NOT NULL,"
    "  reason TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq)",
};

// What takes a store of version i to i + 1, from version 1 on (kSchema
// above is version 1).
constexpr const char* kMigrations[][2] = {
    // 2: who submitted each job, for per-user limits; '' for jobs of
    // version 1 and for servers without identities.
    {"ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
     "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, state)"},
    // 3: where each job writes, resolved and confined at submission, and
    // whether its owner was an admin then (the check is made again at
    // launch); '' for jobs stored before.
    {"ALTER TABLE jobs ADD COLUMN output_path TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE jobs ADD COLUMN owner_is_admin INTEGER NOT NULL DEFAULT 0"},
};
static_assert(std::size(kMigrations) == kSchemaVersion - 1);

// The columns of a JobRecord, in the order ReadJob() expects them.
#define MOMENTUM_JOB_COLUMNS                                                  \
  "seq, id, name, priority, world_size, state, state_reason, spec_yaml, "     \
  "output_dir, submit_ms, start_ms, end_ms, restarts, attempt, export_path, " \
  "knn_top1, owner, output_path, owner_is_admin"

// The status code for an SQLite result code, by what the caller should do.
absl::StatusCode CodeFor(int rc) {
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::StatusCode::kUnavailable;  // another writer; retry
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::StatusCode::kDataLoss;
    case SQLITE_FULL:
    case SQLITE_NOMEM:
      return absl::StatusCode::kResourceExhausted;
    case SQLITE_PERM:
    case SQLITE_READONLY:
    case SQLITE_AUTH:
      return absl::StatusCode::kPermissionDenied;
    case SQLITE_CANTOPEN:
      return absl::StatusCode::kFailedPrecondition;
    case SQLITE_TOOBIG:
    case SQLITE_RANGE:
      return absl::StatusCode::kInvalidArgument;
    default:
      return absl::StatusCode::kInternal;
  }
}

// The folder that holds `path`.
std::string FolderOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Checks up front what SQLite would otherwise report as "unable to open
// database file", without saying which part is wrong. In WAL mode SQLite
// also creates `path`-wal and `path`-shm beside the file, so the folder
// itself must be writable.
absl::Status CheckFolder(const std::string& path) {
  const std::string folder = FolderOf(path);
  struct stat st;
  if (stat(folder.c_str(), &st) != 0) {
    const int err = errno;
    const std::string what = absl::StrCat(path, ": opening job store: folder ",
                                          folder, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(what)
                         : absl::FailedPreconditionError(what);
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": opening job store: ", folder, " is not a folder"));
  }
  if (access(folder.c_str(), W_OK | X_OK) != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, ": opening job store: folder ", folder,
                     " is not writable: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

bool OutputPathsOverlap(const std::string& a, const std::string& b) {
  // One is a prefix of the other that ends at a component boundary.
  const std::string& shorter = a.size() <= b.size() ? a : b;
  const std::string& longer = a.size() <= b.size() ? b : a;
  if (shorter.empty() || longer.compare(0, shorter.size(), shorter) != 0) {
    return false;
  }
  return longer.size() == shorter.size() || shorter.back() == '/' ||
         longer[shorter.size()] == '/';
}

struct JobStore::Impl {
  // One cached prepared statement in use. Binding errors are kept and
  // reported by the first Step(); the statement is reset (its bindings
  // cleared) when the last row has been read, on an error, and on
  // destruction, so no statement keeps a read open past its use.
  class Stmt {
   public:
    Stmt(Impl* impl, sqlite3_stmt* stmt) : impl_(impl), stmt_(stmt) {}
    Stmt(const Stmt&) = delete;
    Stmt& operator=(const Stmt&) = delete;
    Stmt(Stmt&& other) noexcept
        : impl_(other.impl_),
          stmt_(std::exchange(other.stmt_, nullptr)),
          bind_rc_(other.bind_rc_) {}
    ~Stmt() { Reset(); }

    Stmt& Bind(int index, int64_t value) {
      Keep(sqlite3_bind_int64(stmt_, index, value));
      return *this;
    }
    Stmt& Bind(int index, double value) {
      Keep(sqlite3_bind_double(stmt_, index, value));
      return *this;
    }
    Stmt& Bind(int index, absl::string_view value) {
      // A null pointer would bind NULL, not "".
      Keep(sqlite3_bind_text(stmt_, index,
                             value.data() != nullptr ? value.data() : "",
                             static_cast<int>(value.size()), SQLITE_TRANSIENT));
      return *this;
    }

    // True with a row to read, false when done.
    absl::StatusOr<bool> Step(absl::string_view op) {
      if (bind_rc_ != SQLITE_OK) {
        const absl::Status status(
            CodeFor(bind_rc_),
            absl::StrCat(impl_->path_, ": ", op,
                         ": binding a value: ", sqlite3_errstr(bind_rc_)));
        Reset();
        return status;
      }
      const int rc = sqlite3_step(stmt_);
      if (rc == SQLITE_ROW) return true;
      if (rc == SQLITE_DONE) {
        Reset();
        return false;
      }
      // Read the message before the reset, which may replace it.
      const absl::Status status = impl_->Error(rc, op);
      Reset();
      return status;
    }

    // Steps a statement that returns no rows.
    absl::Status Run(absl::string_view op) {
      MOMENTUM_ASSIGN_OR_RETURN(const bool row, Step(op));
      if (row) Reset();
      return absl::OkStatus();
    }

    sqlite3_stmt* get() const { return stmt_; }

   private:
    void Keep(int rc) {
      if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    }
    void Reset() {
      if (stmt_ != nullptr) {
        sqlite3_reset(stmt_);
        sqlite3_clear_bindings(stmt_);
      }
      bind_rc_ = SQLITE_OK;
    }

    Impl* impl_;
    sqlite3_stmt* stmt_;
    int bind_rc_ = SQLITE_OK;
  };

  // Rolls back on destruction unless committed, so every early return
  // inside a transaction leaves the file as it was. Begun and committed by
  // BeginLocked() and CommitLocked().
  class Transaction {
   public:
    Transaction() = default;
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    ~Transaction() {
      // SQLite may already have rolled back by itself (e.g. on SQLITE_FULL).
      if (db_ != nullptr && !sqlite3_get_autocommit(db_)) {
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      }
    }

   private:
    friend struct Impl;
    sqlite3* db_ = nullptr;  // set while open
  };

  Impl(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}

  ~Impl() {
    for (auto& [sql, stmt] : cache_) sqlite3_finalize(stmt);
    // Closing the last connection checkpoints the WAL into the file. Every
    // commit is already durable, so a failure here loses nothing.
    sqlite3_close(db_);
  }

  // "<path>: <op>: <sqlite's message>", with a code from `rc`.
  absl::Status Error(int rc, absl::string_view op) const {
    return absl::Status(
        CodeFor(rc), absl::StrCat(path_, ": ", op, ": ", sqlite3_errmsg(db_)));
  }

  absl::StatusOr<Stmt> PrepareLocked(const std::string& sql,
                                     absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      sqlite3_stmt* stmt = nullptr;
      const int rc = sqlite3_prepare_v3(
          db_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
      if (rc != SQLITE_OK) return Error(rc, op);
      it = cache_.emplace(sql, stmt).first;
    }
    return Stmt(this, it->second);
  }

  // IMMEDIATE takes the write lock now, so a write never fails halfway
  // for want of it; DEFERRED (for reads) just pins one snapshot.
  absl::Status BeginLocked(Transaction& txn, bool write, absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOMENTUM_ASSIGN_OR_RETURN(
        Stmt begin, PrepareLocked(write ? "BEGIN IMMEDIATE" : "BEGIN", op));
    MOMENTUM_RETURN_IF_ERROR(begin.Run(op));
    txn.db_ = db_;
    return absl::OkStatus();
  }

  absl::Status CommitLocked(Transaction& txn, absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOMENTUM_ASSIGN_OR_RETURN(Stmt commit, PrepareLocked("COMMIT", op));
    MOMENTUM_RETURN_IF_ERROR(commit.Run(op));
    txn.db_ = nullptr;
    return absl::OkStatus();
  }

  // A PRAGMA's single value as text ("" when it returns no row).
  absl::StatusOr<std::string> PragmaLocked(const std::string& sql,
                                           absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v2(db_, sql.c_str(), -1, &raw, nullptr);
    if (rc != SQLITE_OK) return Error(rc, op);
    // Not cached: each runs once. Declared before `stmt`, so the statement
    // is reset before it is finalized.
    std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> owned(
        raw, &sqlite3_finalize);
    Stmt stmt(this, raw);
    MOMENTUM_ASSIGN_OR_RETURN(const bool row, stmt.Step(op));
    if (!row) return std::string();
    const unsigned char* text = sqlite3_column_text(raw, 0);
    return text == nullptr ? std::string()
                           : std::string(reinterpret_cast<const char*>(text));
  }

  // Settings and schema; run once by Open().
  absl::Status SetUp() {
    absl::MutexLock lock(&mu_);
    sqlite3_extended_result_codes(db_, 1);
    sqlite3_busy_timeout(db_, kBusyTimeoutMs);
    // journal_mode answers with the mode in force: "memory" for an
    // in-memory database, the old mode when the change failed.
    MOMENTUM_ASSIGN_OR_RETURN(
        const std::string mode,
        PragmaLocked("PRAGMA journal_mode=WAL", "setting WAL mode"));
    if (absl::AsciiStrToLower(mode) != "wal") {
      return absl::FailedPreconditionError(absl::StrCat(
          path_, ": setting WAL mode: journal mode is \"", mode, "\""));
    }
    MOMENTUM_RETURN_IF_ERROR(
        PragmaLocked("PRAGMA synchronous=FULL", "setting synchronous=FULL")
            .status());
    MOMENTUM_RETURN_IF_ERROR(
        PragmaLocked("PRAGMA foreign_keys=ON", "enabling foreign keys")
            .status());
    MOMENTUM_ASSIGN_OR_RETURN(
        const std::string synchronous,
        PragmaLocked("PRAGMA synchronous", "reading synchronous"));
    MOMENTUM_ASSIGN_OR_RETURN(
        const std::string foreign_keys,
        PragmaLocked("PRAGMA foreign_keys", "reading foreign_keys"));
    if (synchronous != "2" || foreign_keys != "1") {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": configuring: synchronous is ", synchronous,
                       " (want 2, FULL) and foreign_keys is \"", foreign_keys,
                       "\" (want 1)"));
    }

    // Under the write lock, so two coordinators starting at once cannot
    // both create the schema.
    constexpr absl::string_view kOp = "creating schema";
    Transaction txn;
    MOMENTUM_RETURN_IF_ERROR(BeginLocked(txn, /*write=*/true, kOp));
    MOMENTUM_ASSIGN_OR_RETURN(
        const std::string version_text,
        PragmaLocked("PRAGMA user_version", "reading schema version"));
    const int version = std::atoi(version_text.c_str());
    if (version > kSchemaVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          path_, ": reading schema version: the file has version ", version,
          ", newer than this coordinator's ", kSchemaVersion));
    }
    if (version < kSchemaVersion) {
      auto exec = [this, kOp](const char* sql) -> absl::Status {
        char* message = nullptr;
        const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &message);
        sqlite3_free(message);
        return rc == SQLITE_OK ? absl::OkStatus() : Error(rc, kOp);
      };
      if (version == 0) {
        for (const char* sql : kSchema) MOMENTUM_RETURN_IF_ERROR(exec(sql));
      }
      for (int v = std::max(version, 1); v < kSchemaVersion; ++v) {
        for (const char* sql : kMigrations[v - 1]) {
          MOMENTUM_RETURN_IF_ERROR(exec(sql));
        }
      }
      MOMENTUM_RETURN_IF_ERROR(
          PragmaLocked(absl::StrCat("PRAGMA user_version = ", kSchemaVersion),
                       kOp)
              .status());
    }
    return CommitLocked(txn, kOp);
  }

  // Reads the MOMENTUM_JOB_COLUMNS of the current row.
  absl::StatusOr<JobRecord> ReadJob(sqlite3_stmt* stmt) const {
    auto text = [stmt](int column) {
      const unsigned char* data = sqlite3_column_text(stmt, column);
      if (data == nullptr) return std::string();
      return std::string(reinterpret_cast<const char*>(data),
                         sqlite3_column_bytes(stmt, column));
    };
    JobRecord job;
    job.seq = sqlite3_column_int64(stmt, 0);
    job.id = text(1);
    job.name = text(2);
    job.priority = sqlite3_column_int64(stmt, 3);
    job.world_size = sqlite3_column_int64(stmt, 4);
    MOMENTUM_ASSIGN_OR_RETURN(job.state,
                              ToState(sqlite3_column_int64(stmt, 5), job.id));
    job.state_reason = text(6);
    job.spec_yaml = text(7);
    job.output_dir = text(8);
    job.submit_ms = sqlite3_column_int64(stmt, 9);
    job.start_ms = sqlite3_column_int64(stmt, 10);
    job.end_ms = sqlite3_column_int64(stmt, 11);
    job.restarts = sqlite3_column_int64(stmt, 12);
    job.attempt = sqlite3_column_int64(stmt, 13);
    job.export_path = text(14);
    job.knn_top1 = sqlite3_column_double(stmt, 15);
    job.owner = text(16);
    job.output_path = text(17);
    job.owner_is_admin = sqlite3_column_int64(stmt, 18) != 0;
    return job;
  }

  absl::StatusOr<JobState> ToState(int64_t value, absl::string_view id) const {
    if (value != static_cast<int>(value) ||
        !v1::JobState_IsValid(static_cast<int>(value))) {
      return absl::DataLossError(
          absl::StrCat(path_, ": reading ", id, ": unknown state ", value));
    }
    return static_cast<JobState>(value);
  }

  // Every row of a query over MOMENTUM_JOB_COLUMNS.
  absl::StatusOr<std::vector<JobRecord>> ReadJobs(Stmt& stmt,
                                                  absl::string_view op) {
    std::vector<JobRecord> jobs;
    while (true) {
      MOMENTUM_ASSIGN_OR_RETURN(const bool row, stmt.Step(op));
      if (!row) break;
      MOMENTUM_ASSIGN_OR_RETURN(JobRecord job, ReadJob(stmt.get()));
      jobs.push_back(std::move(job));
    }
    return jobs;
  }

  // The job with `id`; NOT_FOUND names the id.
  absl::StatusOr<JobRecord> FindLocked(const std::string& id,
                                       absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOMENTUM_ASSIGN_OR_RETURN(
        Stmt stmt,
        PrepareLocked("SELECT " MOMENTUM_JOB_COLUMNS " FROM jobs WHERE id = ?1",
                      op));
    stmt.Bind(1, id);
    MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> jobs, ReadJobs(stmt, op));
    if (jobs.empty()) {
      return absl::NotFoundError(absl::StrCat("no job with id \"", id, "\""));
    }
    return std::move(jobs.front());
  }

  // See CheckOutputFree().
  absl::Status CheckOutputFreeLocked(const std::string& output_path,
                                     const std::string& owner,
                                     const std::string& self_id,
                                     absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Every job that could be in the way; the paths are compared here, by
    // component, not by SQL patterns ('_' and '%' are LIKE's wildcards).
    MOMENTUM_ASSIGN_OR_RETURN(
        Stmt stmt,
        PrepareLocked("SELECT " MOMENTUM_JOB_COLUMNS
                      " FROM jobs WHERE output_path != '' AND id != ?1 AND "
                      "(state IN (?2, ?3, ?4) OR owner != ?5) ORDER BY seq",
                      op));
    stmt.Bind(1, self_id)
        .Bind(2, static_cast<int64_t>(v1::JOB_STATE_PENDING))
        .Bind(3, static_cast<int64_t>(v1::JOB_STATE_RUNNING))
        .Bind(4, static_cast<int64_t>(v1::JOB_STATE_RESTARTING))
        .Bind(5, owner);
    MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> jobs, ReadJobs(stmt, op));
    for (const JobRecord& other : jobs) {
      if (!OutputPathsOverlap(output_path, other.output_path)) continue;
      // Overlapping paths: the longer one lies inside the shorter.
      const char* how = output_path.size() == other.output_path.size() ? "is"
                        : output_path.size() > other.output_path.size()
                            ? "lies inside"
                            : "contains";
      return absl::FailedPreconditionError(absl::StrCat(
          "output_dir ", output_path, " ", how, " the output of ", other.id,
          " (", StateName(other.state),
          other.owner != owner
              ? absl::StrCat(", submitted by ", other.owner.empty()
                                                    ? "an anonymous caller"
                                                    : other.owner)
              : std::string(),
          "): a job may not write into another job's output; pick another "
          "output_dir"));
    }
    return absl::OkStatus();
  }

  absl::Status AddEventLocked(const std::string& id, int64_t time_ms,
                              JobState from, JobState to,
                              const std::string& reason, absl::string_view op)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOMENTUM_ASSIGN_OR_RETURN(
        Stmt stmt, PrepareLocked("INSERT INTO events (job_id, time_ms, "
                                 "from_state, to_state, reason) "
                                 "VALUES (?1, ?2, ?3, ?4, ?5)",
                                 op));
    stmt.Bind(1, id)
        .Bind(2, time_ms)
        .Bind(3, static_cast<int64_t>(from))
        .Bind(4, static_cast<int64_t>(to))
        .Bind(5, reason);
    return stmt.Run(op);
  }

  sqlite3* const db_;
  const std::string path_;
  // Held for every use of the connection (sqlite3 is opened without its own
  // mutex) and of the statement cache.
  absl::Mutex mu_;
  // Prepared statements by SQL text; finalized on destruction.
  std::unordered_map<std::string, sqlite3_stmt*> cache_ ABSL_GUARDED_BY(mu_);
};

JobStore::JobStore(sqlite3* db, std::string path)
    : impl_(std::make_unique<Impl>(db, std::move(path))) {}

JobStore::~JobStore() = default;

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(
    const std::string& path) {
  if (path.empty()) {
    return absl::InvalidArgumentError("opening job store: the path is empty");
  }
  MOMENTUM_RETURN_IF_ERROR(CheckFolder(path));
  sqlite3* db = nullptr;
  // NOMUTEX: Impl::mu_ already serialises every use of the connection.
  const int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
      nullptr);
  if (rc != SQLITE_OK) {
    const absl::Status status(
        CodeFor(rc),
        absl::StrCat(path, ": opening job store: ",
                     db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc)));
    sqlite3_close(db);
    return status;
  }
  std::unique_ptr<JobStore> store(new JobStore(db, path));
  MOMENTUM_RETURN_IF_ERROR(store->impl_->SetUp());
  return store;
}

absl::StatusOr<JobRecord> JobStore::Insert(JobRecord job, int64_t now_ms,
                                           int64_t max_pending_per_owner) {
  constexpr absl::string_view kOp = "inserting job";
  if (std::isnan(job.knn_top1)) {
    // SQLite would store NaN as NULL.
    return absl::InvalidArgumentError(
        absl::StrCat(impl_->path_, ": ", kOp, ": knn_top1 is NaN"));
  }
  absl::MutexLock lock(&impl_->mu_);
  Impl::Transaction txn;
  MOMENTUM_RETURN_IF_ERROR(impl_->BeginLocked(txn, /*write=*/true, kOp));
  if (max_pending_per_owner > 0) {
    // Counted in the inserting transaction: concurrent submissions of one
    // owner cannot both pass the last free place.
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt count,
        impl_->PrepareLocked(
            "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND state = ?2", kOp));
    count.Bind(1, job.owner)
        .Bind(2, static_cast<int64_t>(v1::JOB_STATE_PENDING));
    MOMENTUM_ASSIGN_OR_RETURN(const bool row, count.Step(kOp));
    const int64_t queued = row ? sqlite3_column_int64(count.get(), 0) : 0;
    if (queued >= max_pending_per_owner) {
      return absl::ResourceExhaustedError(absl::StrCat(
          job.owner.empty() ? "anonymous users already have "
                            : job.owner + " already has ",
          queued, " queued (PENDING) job", queued == 1 ? "" : "s",
          "; this server allows ", max_pending_per_owner, " per user"));
    }
  }
  if (!job.output_path.empty()) {
    MOMENTUM_RETURN_IF_ERROR(
        impl_->CheckOutputFreeLocked(job.output_path, job.owner, "", kOp));
  }
  {
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt insert,
        impl_->PrepareLocked(
            "INSERT INTO jobs (name, priority, world_size, state, "
            "state_reason, spec_yaml, output_dir, submit_ms, start_ms, end_ms, "
            "restarts, attempt, export_path, knn_top1, owner, output_path, "
            "owner_is_admin) "
            "VALUES (?1, ?2, ?3, ?4, 'submitted', ?5, ?6, ?7, 0, 0, ?8, ?9, "
            "?10, ?11, ?12, ?13, ?14)",
            kOp));
    insert.Bind(1, job.name)
        .Bind(2, job.priority)
        .Bind(3, job.world_size)
        .Bind(4, static_cast<int64_t>(v1::JOB_STATE_PENDING))
        .Bind(5, job.spec_yaml)
        .Bind(6, job.output_dir)
        .Bind(7, now_ms)
        .Bind(8, job.restarts)
        .Bind(9, job.attempt)
        .Bind(10, job.export_path)
        .Bind(11, job.knn_top1)
        .Bind(12, job.owner)
        .Bind(13, job.output_path)
        .Bind(14, static_cast<int64_t>(job.owner_is_admin ? 1 : 0));
    MOMENTUM_RETURN_IF_ERROR(insert.Run(kOp));
  }
  // The id comes from the seq AUTOINCREMENT just gave, in the same
  // transaction, so ids are never reused and no reader sees a row without.
  const int64_t seq = sqlite3_last_insert_rowid(impl_->db_);
  const std::string id = absl::StrCat("job-", seq);
  {
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt set_id,
        impl_->PrepareLocked("UPDATE jobs SET id = ?1 WHERE seq = ?2", kOp));
    set_id.Bind(1, id).Bind(2, seq);
    MOMENTUM_RETURN_IF_ERROR(set_id.Run(kOp));
  }
  MOMENTUM_RETURN_IF_ERROR(
      impl_->AddEventLocked(id, now_ms, v1::JOB_STATE_UNSPECIFIED,
                            v1::JOB_STATE_PENDING, "submitted", kOp));
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord stored, impl_->FindLocked(id, kOp));
  MOMENTUM_RETURN_IF_ERROR(impl_->CommitLocked(txn, kOp));
  return stored;
}

absl::Status JobStore::CheckOutputFree(const std::string& output_path,
                                       const std::string& owner,
                                       const std::string& self_id) const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->CheckOutputFreeLocked(output_path, owner, self_id,
                                      "checking output paths");
}

absl::StatusOr<JobRecord> JobStore::Get(const std::string& id) const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->FindLocked(id, "reading job");
}

absl::StatusOr<std::vector<JobRecord>> JobStore::List(const JobFilter& filter,
                                                      int64_t offset,
                                                      int64_t limit,
                                                      int64_t* total) const {
  constexpr absl::string_view kOp = "listing jobs";
  if (offset < 0 || limit < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("listing jobs: offset (", offset, ") and limit (", limit,
                     ") must not be negative"));
  }
  // Only the number of placeholders depends on the filter; the values are
  // all bound. Duplicates are dropped so the cache holds few variants.
  std::vector<JobState> states;
  for (const JobState state : filter.states) {
    if (std::find(states.begin(), states.end(), state) == states.end()) {
      states.push_back(state);
    }
  }
  std::string where = "WHERE instr(name, ?1) > 0";
  if (!states.empty()) {
    absl::StrAppend(&where, " AND state IN (");
    for (size_t i = 0; i < states.size(); ++i) {
      absl::StrAppend(&where, i == 0 ? "" : ", ", "?", i + 2);
    }
    absl::StrAppend(&where, ")");
  }
  const int owner_index = static_cast<int>(states.size()) + 2;
  if (filter.owner) absl::StrAppend(&where, " AND owner = ?", owner_index);
  auto bind_filter = [&](Impl::Stmt& stmt) {
    // instr(name, '') is 1: the empty name filter matches every job.
    stmt.Bind(1, filter.name_contains);
    for (size_t i = 0; i < states.size(); ++i) {
      stmt.Bind(static_cast<int>(i + 2), static_cast<int64_t>(states[i]));
    }
    if (filter.owner) stmt.Bind(owner_index, *filter.owner);
  };

  absl::MutexLock lock(&impl_->mu_);
  // One snapshot for the count and the page.
  Impl::Transaction txn;
  MOMENTUM_RETURN_IF_ERROR(impl_->BeginLocked(txn, /*write=*/false, kOp));
  if (total != nullptr) {
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt count,
        impl_->PrepareLocked(absl::StrCat("SELECT COUNT(*) FROM jobs ", where),
                             kOp));
    bind_filter(count);
    MOMENTUM_ASSIGN_OR_RETURN(const bool row, count.Step(kOp));
    if (!row) {
      return absl::InternalError(
          absl::StrCat(impl_->path_, ": ", kOp, ": COUNT(*) returned no row"));
    }
    *total = sqlite3_column_int64(count.get(), 0);
  }
  const int placeholders =
      static_cast<int>(states.size()) + 1 + (filter.owner ? 1 : 0);
  MOMENTUM_ASSIGN_OR_RETURN(
      Impl::Stmt select,
      impl_->PrepareLocked(
          absl::StrCat("SELECT " MOMENTUM_JOB_COLUMNS " FROM jobs ", where,
                       " ORDER BY seq DESC LIMIT ?", placeholders + 1,
                       " OFFSET ?", placeholders + 2),
          kOp));
  bind_filter(select);
  // A negative LIMIT means no limit to SQLite.
  select.Bind(placeholders + 1, limit == 0 ? int64_t{-1} : limit)
      .Bind(placeholders + 2, offset);
  MOMENTUM_ASSIGN_OR_RETURN(std::vector<JobRecord> jobs,
                            impl_->ReadJobs(select, kOp));
  MOMENTUM_RETURN_IF_ERROR(impl_->CommitLocked(txn, kOp));
  return jobs;
}

absl::StatusOr<std::vector<JobRecord>> JobStore::Pending() const {
  constexpr absl::string_view kOp = "listing pending jobs";
  absl::MutexLock lock(&impl_->mu_);
  MOMENTUM_ASSIGN_OR_RETURN(
      Impl::Stmt stmt, impl_->PrepareLocked("SELECT " MOMENTUM_JOB_COLUMNS
                                            " FROM jobs WHERE state = ?1 "
                                            "ORDER BY priority DESC, seq ASC",
                                            kOp));
  stmt.Bind(1, static_cast<int64_t>(v1::JOB_STATE_PENDING));
  return impl_->ReadJobs(stmt, kOp);
}

absl::StatusOr<std::vector<JobRecord>> JobStore::Active() const {
  constexpr absl::string_view kOp = "listing active jobs";
  absl::MutexLock lock(&impl_->mu_);
  MOMENTUM_ASSIGN_OR_RETURN(
      Impl::Stmt stmt,
      impl_->PrepareLocked("SELECT " MOMENTUM_JOB_COLUMNS " FROM jobs "
                           "WHERE state IN (?1, ?2, ?3) "
                           "ORDER BY seq ASC",
                           kOp));
  stmt.Bind(1, static_cast<int64_t>(v1::JOB_STATE_PENDING))
      .Bind(2, static_cast<int64_t>(v1::JOB_STATE_RUNNING))
      .Bind(3, static_cast<int64_t>(v1::JOB_STATE_RESTARTING));
  return impl_->ReadJobs(stmt, kOp);
}

absl::StatusOr<JobRecord> JobStore::Transition(const std::string& id,
                                               JobState to,
                                               const std::string& reason,
                                               int64_t now_ms) {
  constexpr absl::string_view kOp = "changing job state";
  absl::MutexLock lock(&impl_->mu_);
  Impl::Transaction txn;
  MOMENTUM_RETURN_IF_ERROR(impl_->BeginLocked(txn, /*write=*/true, kOp));
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord job, impl_->FindLocked(id, kOp));
  const JobState from = job.state;
  if (IsFinal(from)) {
    return absl::FailedPreconditionError(
        absl::StrCat(id, " is ", StateName(from), " (final); cannot move to ",
                     StateName(to)));
  }
  if (!IsAllowedTransition(from, to)) {
    return absl::FailedPreconditionError(absl::StrCat(
        id, " is ", StateName(from), "; cannot move to ", StateName(to)));
  }
  job.state = to;
  job.state_reason = reason;
  if (to == v1::JOB_STATE_RUNNING && job.start_ms == 0) job.start_ms = now_ms;
  if (IsFinal(to)) job.end_ms = now_ms;
  {
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt update,
        impl_->PrepareLocked("UPDATE jobs SET state = ?1, state_reason = ?2, "
                             "start_ms = ?3, end_ms = ?4 WHERE seq = ?5",
                             kOp));
    update.Bind(1, static_cast<int64_t>(to))
        .Bind(2, reason)
        .Bind(3, job.start_ms)
        .Bind(4, job.end_ms)
        .Bind(5, job.seq);
    MOMENTUM_RETURN_IF_ERROR(update.Run(kOp));
  }
  MOMENTUM_RETURN_IF_ERROR(
      impl_->AddEventLocked(id, now_ms, from, to, reason, kOp));
  MOMENTUM_ASSIGN_OR_RETURN(JobRecord stored, impl_->FindLocked(id, kOp));
  MOMENTUM_RETURN_IF_ERROR(impl_->CommitLocked(txn, kOp));
  return stored;
}

absl::Status JobStore::UpdateRun(const JobRecord& job) {
  constexpr absl::string_view kOp = "updating job run";
  if (std::isnan(job.knn_top1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        impl_->path_, ": ", kOp, ": knn_top1 of ", job.id, " is NaN"));
  }
  absl::MutexLock lock(&impl_->mu_);
  Impl::Transaction txn;
  MOMENTUM_RETURN_IF_ERROR(impl_->BeginLocked(txn, /*write=*/true, kOp));
  {
    MOMENTUM_ASSIGN_OR_RETURN(
        Impl::Stmt update,
        impl_->PrepareLocked("UPDATE jobs SET attempt = ?1, restarts = ?2, "
                             "export_path = ?3, knn_top1 = ?4, output_path = "
                             "?6 WHERE id = ?5",
                             kOp));
    update.Bind(1, job.attempt)
        .Bind(2, job.restarts)
        .Bind(3, job.export_path)
        .Bind(4, job.knn_top1)
        .Bind(5, job.id)
        .Bind(6, job.output_path);
    MOMENTUM_RETURN_IF_ERROR(update.Run(kOp));
  }
  if (sqlite3_changes(impl_->db_) == 0) {
    return absl::NotFoundError(absl::StrCat("no job with id \"", job.id, "\""));
  }
  return impl_->CommitLocked(txn, kOp);
}

absl::StatusOr<std::vector<JobEvent>> JobStore::Events(
    const std::string& id) const {
  constexpr absl::string_view kOp = "reading job events";
  absl::MutexLock lock(&impl_->mu_);
  // One snapshot, so a job found is a job whose events are all there.
  Impl::Transaction txn;
  MOMENTUM_RETURN_IF_ERROR(impl_->BeginLocked(txn, /*write=*/false, kOp));
  MOMENTUM_RETURN_IF_ERROR(impl_->FindLocked(id, kOp).status());
  MOMENTUM_ASSIGN_OR_RETURN(
      Impl::Stmt stmt,
      impl_->PrepareLocked("SELECT seq, job_id, time_ms, from_state, to_state, "
                           "reason FROM events WHERE job_id = ?1 ORDER BY seq",
                           kOp));
  stmt.Bind(1, id);
  std::vector<JobEvent> events;
  while (true) {
    MOMENTUM_ASSIGN_OR_RETURN(const bool row, stmt.Step(kOp));
    if (!row) break;
    sqlite3_stmt* raw = stmt.get();
    JobEvent event;
    event.seq = sqlite3_column_int64(raw, 0);
    event.job_id = reinterpret_cast<const char*>(sqlite3_column_text(raw, 1));
    event.time_ms = sqlite3_column_int64(raw, 2);
    MOMENTUM_ASSIGN_OR_RETURN(event.from,
                              impl_->ToState(sqlite3_column_int64(raw, 3), id));
    MOMENTUM_ASSIGN_OR_RETURN(event.to,
                              impl_->ToState(sqlite3_column_int64(raw, 4), id));
    const unsigned char* reason = sqlite3_column_text(raw, 5);
    event.reason = std::string(reinterpret_cast<const char*>(reason),
                               sqlite3_column_bytes(raw, 5));
    events.push_back(std::move(event));
  }
  MOMENTUM_RETURN_IF_ERROR(impl_->CommitLocked(txn, kOp));
  return events;
}

}  // namespace momentum::server
