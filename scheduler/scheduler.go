package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Defaults of Config.
const (
	DefaultTick               = time.Second
	DefaultBatch              = 500
	DefaultLease              = 2 * time.Minute
	DefaultJitter             = state.DefaultJitter
	DefaultMaxLowPending      = 50_000
	DefaultEnqueueConcurrency = 16
	DefaultCheckBatch         = 50
)

const (
	// maxJitter keeps the spread below the interval itself.
	maxJitter = 0.5
	// backoffMax caps the pause after consecutive failed sweeps.
	backoffMax = 30 * time.Second
	// failAfter consecutive enqueue errors end a sweep (Redis is likely
	// down): the remaining claims wait for their lease.
	failAfter = 3
	// rescheduleBatch is how many reschedules one RescheduleBatch call
	// carries at most.
	rescheduleBatch = 256
	// drainTimeout bounds the enqueues of already claimed work after the
	// context is done.
	drainTimeout = 5 * time.Second
	// logEvery rate-limits error logs of one kind.
	logEvery = 5 * time.Second
)

// Store is what the scheduler needs from the connection store.
type Store interface {
	// Shards returns the number of index shards.
	Shards() int
	// ClaimDue atomically takes up to max due members of one shard and
	// pushes them to now+lease.
	ClaimDue(ctx context.Context, idx state.Index, shard int, now time.Time, lease time.Duration, max int) ([]state.Claim, error)
	// RescheduleClaim sets the next due time of a claimed member if it
	// still carries the claim's lease score (false: a write since the
	// claim moved or removed it).
	RescheduleClaim(ctx context.Context, idx state.Index, c state.Claim, next time.Time) (bool, error)
	// OldestDue returns the earliest unclaimed due time at or before now.
	OldestDue(ctx context.Context, idx state.Index, now time.Time) (time.Time, bool, error)
}

var _ Store = (*state.Store)(nil)

// BatchRescheduler is implemented by a Store that can set the next due
// times of many claims in one round trip (each only if the member still
// carries its claim's lease score, as Reschedule does). The scheduler uses
// it when the Store has it, up to 256 claims a call; otherwise it calls
// Reschedule once per claim. On a Redis-bound machine that one command per
// claim makes the difference between about half and about 0.7 of the raw
// asynq enqueue rate (BenchmarkSweep).
type BatchRescheduler interface {
	RescheduleBatch(ctx context.Context, idx state.Index, claims []state.Claim, next []time.Time) (int, error)
}

// Enqueuer enqueues tasks; *asynq.Client is one.
type Enqueuer interface {
	EnqueueContext(ctx context.Context, task *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error)
}

var _ Enqueuer = (*asynq.Client)(nil)

// QueueInspector reads queue sizes for backpressure; *asynq.Inspector is
// one.
type QueueInspector interface {
	Queues() ([]string, error)
	GetQueueInfo(queue string) (*asynq.QueueInfo, error)
}

var _ QueueInspector = (*asynq.Inspector)(nil)

// TaskInspector finds and deletes one task; *asynq.Inspector is one. With
// it, a refresh chain that asynq archived (retries exhausted) is deleted
// when the connection's refresh comes due again, since its task id would
// otherwise refuse every new refresh of that connection.
type TaskInspector interface {
	GetTaskInfo(queue, id string) (*asynq.TaskInfo, error)
	DeleteTask(queue, id string) error
}

var _ TaskInspector = (*asynq.Inspector)(nil)

// Config configures a Scheduler. Store, Catalog and Client are required;
// every other field works at its zero value.
type Config struct {
	// Store holds the due indexes.
	Store Store
	// Catalog gives each integration's check intervals and refresh window.
	Catalog *catalog.Catalog
	// Client enqueues the tasks (an *asynq.Client).
	Client Enqueuer
	// Inspector reads the low queue's pending size for backpressure. If
	// nil, there is no backpressure.
	Inspector QueueInspector
	// Tick is the pause between sweeps. If zero, DefaultTick.
	Tick time.Duration
	// Batch is how many members one claim takes from one shard. A sweep
	// claims a shard again while it yields full batches, so a backlog
	// drains at enqueue speed. If zero, DefaultBatch.
	Batch int
	// Lease is how long a claim is held: a claim whose enqueue never
	// happened is due again after it. If zero, DefaultLease.
	Lease time.Duration
	// Jitter spreads the next check time over ±Jitter×interval, by a
	// fraction fixed per connection (state.Jitter). If zero, DefaultJitter;
	// negative means no jitter; at most 0.5.
	Jitter float64
	// MaxLowPending pauses periodic check sweeps while the low queue holds
	// at least this many pending tasks. If zero, DefaultMaxLowPending;
	// negative means no limit.
	MaxLowPending int
	// EnqueueConcurrency bounds parallel enqueues. If zero,
	// DefaultEnqueueConcurrency.
	EnqueueConcurrency int
	// CheckBatch is how many periodic checks of one integration, claimed
	// together, go into one connection:validate_batch task (the worker
	// checks each member on its own): asynq's cost per task is paid once
	// per batch. The claims of one pass over the shards are grouped by
	// integration, so a batch may be smaller. 1 enqueues one
	// connection:validate per check. If zero, DefaultCheckBatch; at most
	// tasks.MaxBatch.
	CheckBatch int
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer receives the scheduler's metrics. If nil, they are kept
	// but not registered. Schedulers sharing a Registerer share metrics.
	Registerer prometheus.Registerer
	// NowFunc is the clock. If nil, time.Now, and claims use the Redis
	// server's TIME (replicas with skewed clocks agree on leases); if set
	// (tests), claims use it too.
	NowFunc func() time.Time
	// RandFunc returns a uniform number in [0, 1) for the backoff after
	// failed sweeps; it must be safe for concurrent use. If nil,
	// math/rand/v2's Float64.
	RandFunc func() float64
}

func (c Config) withDefaults() Config {
	if c.Tick == 0 {
		c.Tick = DefaultTick
	}
	if c.Batch == 0 {
		c.Batch = DefaultBatch
	}
	if c.Lease == 0 {
		c.Lease = DefaultLease
	}
	switch {
	case c.Jitter == 0:
		c.Jitter = DefaultJitter
	case c.Jitter < 0:
		c.Jitter = 0
	}
	if c.MaxLowPending == 0 {
		c.MaxLowPending = DefaultMaxLowPending
	}
	if c.EnqueueConcurrency == 0 {
		c.EnqueueConcurrency = DefaultEnqueueConcurrency
	}
	if c.CheckBatch == 0 {
		c.CheckBatch = DefaultCheckBatch
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	if c.RandFunc == nil {
		c.RandFunc = rand.Float64
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.Store == nil:
		return errors.New("scheduler: Config.Store is required")
	case c.Catalog == nil:
		return errors.New("scheduler: Config.Catalog is required")
	case c.Client == nil:
		return errors.New("scheduler: Config.Client is required")
	case c.Tick < 0:
		return fmt.Errorf("scheduler: tick must be positive, got %v", c.Tick)
	case c.Batch < 0:
		return fmt.Errorf("scheduler: batch must be positive, got %d", c.Batch)
	case c.Lease < time.Second:
		return fmt.Errorf("scheduler: lease must be at least 1s, got %v", c.Lease)
	case c.Jitter > maxJitter || math.IsNaN(c.Jitter):
		return fmt.Errorf("scheduler: jitter must be between 0 and %v, got %v", maxJitter, c.Jitter)
	case c.CheckBatch < 0 || c.CheckBatch > tasks.MaxBatch:
		return fmt.Errorf("scheduler: check batch must be between 1 and %d, got %d", tasks.MaxBatch, c.CheckBatch)
	case c.EnqueueConcurrency < 0:
		return fmt.Errorf("scheduler: enqueue concurrency must be positive, got %d", c.EnqueueConcurrency)
	case c.Store.Shards() < 1:
		return errors.New("scheduler: the store has no shards")
	}
	return nil
}

// Scheduler sweeps the due indexes and enqueues tasks. Several replicas may
// run at once.
type Scheduler struct {
	cfg Config
	m   *metrics
	// claimNow is the now of claims: zero (Redis TIME) unless
	// Config.NowFunc was set.
	claimNow func() time.Time

	// paused is true while backpressure holds periodic sweeps back.
	paused atomic.Bool

	enqueueLog, rescheduleLog, sweepLog, probeLog *rate.Limiter
}

// New applies defaults to cfg, validates it and returns a Scheduler.
func New(cfg Config) (*Scheduler, error) {
	claimNow := func() time.Time { return time.Time{} }
	if cfg.NowFunc != nil {
		claimNow = cfg.NowFunc
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	every := rate.Every(logEvery)
	return &Scheduler{
		cfg: cfg, m: m, claimNow: claimNow,
		probeLog:      rate.NewLimiter(every, 1),
		enqueueLog:    rate.NewLimiter(every, 1),
		rescheduleLog: rate.NewLimiter(every, 1),
		sweepLog:      rate.NewLimiter(every, 1),
	}, nil
}

// Run sweeps every Tick until ctx is done, then returns nil. A failed
// sweep is logged and followed by an exponential backoff (Tick, 2×Tick,
// ... up to 30s); the loop never gives up.
func (s *Scheduler) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
		start := time.Now()
		err := s.Sweep(ctx)
		if ctx.Err() != nil {
			return nil
		}
		wait := s.cfg.Tick - time.Since(start)
		var refused *RefusedShardsError
		if errors.As(err, &refused) {
			// Redis answered and the other shards were swept: no backoff,
			// the refused shards are tried again next tick.
			if s.sweepLog.Allow() {
				s.cfg.Logger.WarnContext(ctx, "scheduler: shards refused; retried next sweep",
					slog.String("error", err.Error()))
			}
			err = nil
		}
		if err != nil {
			failures++
			wait = s.backoff(failures)
			if s.sweepLog.Allow() {
				s.cfg.Logger.WarnContext(ctx, "scheduler: sweep failed; backing off",
					slog.String("error", err.Error()), slog.Int("failures", failures),
					slog.Duration("backoff", wait))
			}
		} else if failures > 0 {
			s.cfg.Logger.InfoContext(ctx, "scheduler: sweeps resumed", slog.Int("failures", failures))
			failures = 0
		}
		timer.Reset(max(wait, 0))
	}
}

// backoff returns the pause after n consecutive failures: Tick doubled
// n-1 times, capped at 30s, ±20% so replicas do not retry in step.
func (s *Scheduler) backoff(n int) time.Duration {
	return retry.Spread(retry.Exp(n-1, s.cfg.Tick, backoffMax), 0.2, s.cfg.RandFunc())
}

// sweepState is the bookkeeping of one sweep.
type sweepState struct {
	start time.Time
	// consecutive enqueue errors (reset by a success), and whether the
	// sweep gave up because of them.
	consecutive atomic.Int32
	failing     atomic.Bool
	firstErr    atomic.Pointer[error]
	// lastDone is when the latest job of each index finished (unix ns).
	lastDone [2]atomic.Int64
	// resched, when the store batches reschedules, takes them to the
	// batcher goroutine.
	resched chan rescheduled
}

type rescheduled struct {
	idx   state.Index
	claim state.Claim
	next  time.Time
}

// job is one claim to enqueue, or (batch set) the claims of one
// integration's periodic checks to enqueue as one batch.
type job struct {
	idx   state.Index
	claim state.Claim
	batch []state.Claim
}

// checkBatcher groups the periodic checks a sweep claims, across shards,
// by integration: a batch goes out when it holds CheckBatch members, and
// whatever a pass over the shards left is flushed at the end of the pass.
type checkBatcher struct {
	size int
	jobs chan<- job
	open map[string][]state.Claim
}

func (b *checkBatcher) add(c state.Claim) {
	b.open[c.ServiceID] = append(b.open[c.ServiceID], c)
	if len(b.open[c.ServiceID]) >= b.size {
		b.jobs <- job{idx: state.IndexCheck, batch: b.open[c.ServiceID]}
		delete(b.open, c.ServiceID)
	}
}

func (b *checkBatcher) flush() {
	for _, svc := range slices.Sorted(maps.Keys(b.open)) {
		b.jobs <- job{idx: state.IndexCheck, batch: b.open[svc]}
	}
	clear(b.open)
}

func indexNo(idx state.Index) int {
	if idx == state.IndexRefresh {
		return 1
	}
	return 0
}

// Sweep runs one tick: it claims due members of every shard of both
// indexes (refresh first, checks unless backpressure holds them back)
// batch by batch and enqueues their tasks. A shard whose claim fails with
// an error reply (a slot migrating on Redis Cluster, say) is left for the
// next sweep while the other shards go on; after failAfter consecutive
// failures of another kind (Redis unreachable) the sweep stops claiming.
// It returns every claim error and the first enqueue error, joined, after
// enqueueing what it had claimed. A claim whose enqueue failed comes back
// after its lease; claims never tried (the sweep gave up) are given back
// at once when Redis allows.
func (s *Scheduler) Sweep(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ss := &sweepState{start: time.Now()}
	paused := s.checkBackpressure(ctx)
	lastProbe := time.Now()

	var errs []error
	for _, idx := range []state.Index{state.IndexRefresh, state.IndexCheck} {
		if err := s.updateLag(ctx, idx); err != nil {
			if !state.ReplyError(err) {
				return err // Redis unreachable: claims would fail too
			}
			errs = append(errs, err)
		}
	}

	// Jobs already claimed are enqueued even if ctx ends meanwhile, up to
	// drainTimeout later.
	jctx, jcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer jcancel()
	stopDrain := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(drainTimeout, jcancel)
		context.AfterFunc(jctx, func() { t.Stop() })
	})
	defer stopDrain()

	var batched sync.WaitGroup
	if br, ok := s.cfg.Store.(BatchRescheduler); ok {
		ss.resched = make(chan rescheduled, 4*rescheduleBatch)
		batched.Go(func() { s.batchReschedules(jctx, br, ss.resched) })
	}
	jobs := make(chan job, s.cfg.Batch)
	var wg sync.WaitGroup
	var untried untriedClaims
	for range s.cfg.EnqueueConcurrency {
		wg.Go(func() {
			for j := range jobs {
				if ss.failing.Load() {
					untried.add(j) // given back below
					continue
				}
				s.handle(jctx, ss, j)
				ss.lastDone[indexNo(j.idx)].Store(time.Now().UnixNano())
			}
		})
	}

	type cursor struct {
		idx   state.Index
		shard int
	}
	var active []cursor
	for _, idx := range []state.Index{state.IndexRefresh, state.IndexCheck} {
		if idx == state.IndexCheck && paused {
			continue
		}
		for sh := range s.cfg.Store.Shards() {
			active = append(active, cursor{idx, sh})
		}
	}
	var batcher *checkBatcher
	if s.cfg.CheckBatch > 1 {
		batcher = &checkBatcher{size: s.cfg.CheckBatch, jobs: jobs, open: map[string][]state.Claim{}}
	}
	var claimDone [2]time.Time
	claimErrs, failures := 0, 0
claiming:
	for len(active) > 0 {
		next := active[:0]
		for _, c := range active {
			if ctx.Err() != nil || ss.failing.Load() {
				break claiming
			}
			claims, cerr := s.cfg.Store.ClaimDue(ctx, c.idx, c.shard, s.claimNow(), s.cfg.Lease, s.cfg.Batch)
			if cerr != nil {
				// This shard waits for the next sweep; the others go on
				// unless Redis looks unreachable.
				claimErrs++
				errs = append(errs, fmt.Errorf("claim %s shard %d: %w", c.idx, c.shard, cerr))
				if !state.ReplyError(cerr) {
					if failures++; failures >= failAfter {
						break claiming
					}
				}
				continue
			}
			failures = 0
			s.m.claims.WithLabelValues(string(c.idx)).Add(float64(len(claims)))
			for _, cl := range claims {
				if c.idx == state.IndexCheck && batcher != nil {
					batcher.add(cl)
					continue
				}
				jobs <- job{idx: c.idx, claim: cl}
			}
			if len(claims) >= s.cfg.Batch {
				next = append(next, c)
			}
		}
		active = next
		if batcher != nil {
			batcher.flush()
		}
		// A long sweep looks at the low queue again once per Tick.
		if time.Since(lastProbe) >= s.cfg.Tick && slices.ContainsFunc(active, func(c cursor) bool { return c.idx == state.IndexCheck }) {
			lastProbe = time.Now()
			if s.checkBackpressure(ctx) {
				active = slices.DeleteFunc(active, func(c cursor) bool { return c.idx == state.IndexCheck })
			}
		}
		for _, idx := range []state.Index{state.IndexRefresh, state.IndexCheck} {
			if claimDone[indexNo(idx)].IsZero() && !slices.ContainsFunc(active, func(c cursor) bool { return c.idx == idx }) {
				claimDone[indexNo(idx)] = time.Now()
			}
		}
	}
	if batcher != nil {
		batcher.flush() // what a broken-off pass claimed
	}
	close(jobs)
	wg.Wait()
	if ss.resched != nil {
		close(ss.resched)
		batched.Wait()
	}
	s.giveBack(ctx, untried.take())

	if claimErrs == 0 {
		for _, idx := range []state.Index{state.IndexRefresh, state.IndexCheck} {
			if idx == state.IndexCheck && paused {
				continue
			}
			end := claimDone[indexNo(idx)]
			if last := ss.lastDone[indexNo(idx)].Load(); last > end.UnixNano() {
				end = time.Unix(0, last)
			}
			if !end.IsZero() {
				s.m.sweep.WithLabelValues(string(idx)).Observe(end.Sub(ss.start).Seconds())
			}
		}
	}
	refused := len(errs) > 0 && refusedOnly(errs)
	if ss.failing.Load() {
		if p := ss.firstErr.Load(); p != nil {
			errs = append(errs, fmt.Errorf("enqueue: %w", *p))
			refused = false
		}
	}
	if len(errs) == 0 {
		return ctx.Err()
	}
	if refused && ctx.Err() == nil {
		return &RefusedShardsError{errs: errs}
	}
	return errors.Join(errs...)
}

// handle enqueues the task of one claim and, for a check, sets its next
// due time.
func (s *Scheduler) handle(ctx context.Context, ss *sweepState, j job) {
	if j.batch != nil {
		s.handleBatch(ctx, ss, j)
		return
	}
	c := j.claim
	now := s.cfg.NowFunc()
	in, _ := s.cfg.Catalog.Get(c.ServiceID)
	spec, ok := state.SweepTask(j.idx, c, in, now)
	if !ok {
		// Nothing to enqueue; push the member back instead of claiming
		// it again at every lease.
		s.reschedule(ctx, ss, j.idx, c, state.SweepNextCheck(c, in, now, s.cfg.Jitter))
		return
	}
	label := "validate"
	if j.idx == state.IndexRefresh {
		label = "refresh_token"
	}
	task, _, err := spec.New()
	if err != nil {
		// A malformed id never becomes valid: count it, log it, and keep
		// it from coming back at every lease.
		s.m.errors.WithLabelValues(string(j.idx)).Inc()
		if s.enqueueLog.Allow() {
			s.cfg.Logger.ErrorContext(ctx, "scheduler: cannot build task",
				slog.String("index", string(j.idx)), slog.String("consumer_id", c.Ref.ConsumerID),
				slog.String("connection_id", c.Ref.ConnectionID), slog.String("error", err.Error()))
		}
		if j.idx == state.IndexCheck {
			s.reschedule(ctx, ss, j.idx, c, state.SweepNextCheck(c, in, now, s.cfg.Jitter))
		}
		return
	}
	_, err = s.cfg.Client.EnqueueContext(ctx, task)
	if errors.Is(err, asynq.ErrTaskIDConflict) && j.idx == state.IndexRefresh && s.unblockRefresh(spec) {
		_, err = s.cfg.Client.EnqueueContext(ctx, task)
	}
	if !s.enqueued(ctx, ss, j.idx, task.Type(), label, err) {
		return
	}
	if j.idx == state.IndexCheck {
		s.reschedule(ctx, ss, j.idx, c, state.SweepNextCheck(c, in, s.cfg.NowFunc(), s.cfg.Jitter))
	}
}

// enqueued accounts for an enqueue's err and reports whether the task is
// queued (now, or already: a task id conflict), so its claims may be
// rescheduled.
func (s *Scheduler) enqueued(ctx context.Context, ss *sweepState, idx state.Index, typ, label string, err error) bool {
	switch {
	case err == nil:
		s.m.enqueued.WithLabelValues(label).Inc()
	case errors.Is(err, asynq.ErrTaskIDConflict):
		// Already queued (by another replica, or before a lost
		// reschedule): nothing to do but move on.
	default:
		s.m.errors.WithLabelValues(string(idx)).Inc()
		ss.firstErr.CompareAndSwap(nil, &err)
		if ss.consecutive.Add(1) >= failAfter {
			ss.failing.Store(true)
		}
		if s.enqueueLog.Allow() {
			s.cfg.Logger.WarnContext(ctx, "scheduler: enqueue failed; the claim comes back after its lease",
				slog.String("index", string(idx)), slog.String("task_type", typ),
				slog.Duration("lease", s.cfg.Lease), slog.String("error", err.Error()))
		}
		return false
	}
	ss.consecutive.Store(0)
	return true
}

// handleBatch enqueues the periodic checks of one integration's claims as
// one connection:validate_batch and sets each member's next due time. A
// claim of an integration that is not checked is pushed back, as handle
// does; a lone member, or members whose ids cannot make a batch, go one
// by one through handle.
func (s *Scheduler) handleBatch(ctx context.Context, ss *sweepState, j job) {
	now := s.cfg.NowFunc()
	svc := j.batch[0].ServiceID
	in, _ := s.cfg.Catalog.Get(svc)
	members := make([]tasks.BatchMember, 0, len(j.batch))
	claims := make([]state.Claim, 0, len(j.batch))
	for _, c := range j.batch {
		if _, ok := state.SweepTask(j.idx, c, in, now); !ok {
			s.reschedule(ctx, ss, j.idx, c, state.SweepNextCheck(c, in, now, s.cfg.Jitter))
			continue
		}
		members = append(members, tasks.BatchMember{ConsumerID: c.Ref.ConsumerID, ConnectionID: c.Ref.ConnectionID, Due: c.Due.Unix()})
		claims = append(claims, c)
	}
	if len(claims) == 0 {
		return
	}
	var task *asynq.Task
	var err error
	if len(claims) > 1 {
		task, err = tasks.NewValidateBatchTask(svc, members)
	}
	if task == nil || err != nil {
		for _, c := range claims {
			s.handle(ctx, ss, job{idx: j.idx, claim: c})
		}
		return
	}
	_, err = s.cfg.Client.EnqueueContext(ctx, task)
	if !s.enqueued(ctx, ss, j.idx, task.Type(), "validate_batch", err) {
		return
	}
	s.m.batched.Add(float64(len(claims)))
	now = s.cfg.NowFunc()
	for _, c := range claims {
		s.reschedule(ctx, ss, j.idx, c, state.SweepNextCheck(c, in, now, s.cfg.Jitter))
	}
}

// unblockRefresh deletes the connection's refresh task if asynq archived
// it, and reports whether it did (the chain is over; a new one may start).
func (s *Scheduler) unblockRefresh(spec state.Task) bool {
	ti, ok := s.cfg.Inspector.(TaskInspector)
	if !ok {
		return false
	}
	id, queue := spec.ID(), spec.Queue()
	info, err := ti.GetTaskInfo(queue, id)
	if err != nil || info.State != asynq.TaskStateArchived {
		return false
	}
	return ti.DeleteTask(queue, id) == nil
}

// reschedule sets the next due time of a claim, or hands it to the
// batcher when the store batches.
func (s *Scheduler) reschedule(ctx context.Context, ss *sweepState, idx state.Index, c state.Claim, next time.Time) {
	if ss.resched != nil {
		ss.resched <- rescheduled{idx: idx, claim: c, next: next}
		return
	}
	_, err := s.cfg.Store.RescheduleClaim(ctx, idx, c, next)
	s.rescheduleFailed(ctx, idx, err)
}

// batchReschedules sends reschedules to the store rescheduleBatch at a
// time per index, and what is left when in closes.
func (s *Scheduler) batchReschedules(ctx context.Context, br BatchRescheduler, in <-chan rescheduled) {
	type batch struct {
		claims []state.Claim
		next   []time.Time
	}
	bufs := map[state.Index]*batch{state.IndexCheck: {}, state.IndexRefresh: {}}
	flush := func(idx state.Index) {
		b := bufs[idx]
		if len(b.claims) == 0 {
			return
		}
		_, err := br.RescheduleBatch(ctx, idx, b.claims, b.next)
		s.rescheduleFailed(ctx, idx, err)
		b.claims, b.next = b.claims[:0], b.next[:0]
	}
	for r := range in {
		b := bufs[r.idx]
		b.claims, b.next = append(b.claims, r.claim), append(b.next, r.next)
		if len(b.claims) >= rescheduleBatch {
			flush(r.idx)
		}
	}
	flush(state.IndexCheck)
	flush(state.IndexRefresh)
}

// rescheduleFailed logs a failed reschedule. The lease runs out and the
// member is due again: at worst one more task, with another key.
func (s *Scheduler) rescheduleFailed(ctx context.Context, idx state.Index, err error) {
	if err == nil || errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrNotFound) {
		return
	}
	if s.rescheduleLog.Allow() {
		s.cfg.Logger.WarnContext(ctx, "scheduler: reschedule failed",
			slog.String("index", string(idx)), slog.String("error", err.Error()))
	}
}

// checkBackpressure reads the low queue's pending size and reports whether
// periodic checks must pause. An unreadable size does not pause: the claims
// will fail on their own if Redis is down.
func (s *Scheduler) checkBackpressure(ctx context.Context) bool {
	if s.cfg.Inspector == nil || s.cfg.MaxLowPending < 0 {
		return false
	}
	pending, err := s.lowPending()
	if err != nil {
		if s.probeLog.Allow() {
			s.cfg.Logger.WarnContext(ctx, "scheduler: cannot read the low queue size",
				slog.String("queue", tasks.QueueLow), slog.String("error", err.Error()))
		}
		return s.paused.Load()
	}
	paused := pending >= s.cfg.MaxLowPending
	if was := s.paused.Swap(paused); was != paused {
		if paused {
			s.cfg.Logger.WarnContext(ctx, "scheduler: low queue backlog; periodic checks paused",
				slog.String("queue", tasks.QueueLow), slog.Int("pending", pending), slog.Int("limit", s.cfg.MaxLowPending))
		} else {
			s.cfg.Logger.InfoContext(ctx, "scheduler: low queue drained; periodic checks resumed",
				slog.String("queue", tasks.QueueLow), slog.Int("pending", pending), slog.Int("limit", s.cfg.MaxLowPending))
		}
	}
	if paused {
		s.m.backpressure.Set(1)
	} else {
		s.m.backpressure.Set(0)
	}
	return paused
}

func (s *Scheduler) lowPending() (int, error) {
	queues, err := s.cfg.Inspector.Queues()
	if err != nil {
		return 0, err
	}
	if !slices.Contains(queues, tasks.QueueLow) {
		return 0, nil // nothing was ever enqueued there
	}
	info, err := s.cfg.Inspector.GetQueueInfo(tasks.QueueLow)
	if err != nil {
		return 0, err
	}
	return info.Pending, nil
}

// updateLag sets the lag gauge of idx: now minus the oldest unclaimed due
// time, 0 when nothing is overdue.
func (s *Scheduler) updateLag(ctx context.Context, idx state.Index) error {
	now := s.cfg.NowFunc()
	oldest, ok, err := s.cfg.Store.OldestDue(ctx, idx, now)
	if err != nil {
		return fmt.Errorf("oldest due %s: %w", idx, err)
	}
	lag := 0.0
	if ok && now.After(oldest) {
		lag = now.Sub(oldest).Seconds()
	}
	s.m.lag.WithLabelValues(string(idx)).Set(lag)
	return nil
}

// Paused reports whether backpressure holds periodic checks back.
func (s *Scheduler) Paused() bool { return s.paused.Load() }
