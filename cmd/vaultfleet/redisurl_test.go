package main

import (
	"testing"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
)

// TestRedisURLForms: every multi-host form the README shows parses into
// the addresses and master it names (issue 11: the comma lists used to be
// read as one host name, and ?master= was refused).
func TestRedisURLForms(t *testing.T) {
	t.Parallel()
	sentinels := map[string]struct {
		url       string
		addrs     []string
		master    string
		db        int
		sentinelP string
	}{
		"Documented": {"redis-sentinel://127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381/2?master=mymaster",
			[]string{"127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"}, "mymaster", 2, ""},
		"OneSentinel":    {"redis-sentinel://10.0.0.1:26379/0?master=m", []string{"10.0.0.1:26379"}, "m", 0, ""},
		"GoRedisForm":    {"redis-sentinel://127.0.0.1:26379/0?master_name=m&addr=127.0.0.1:26380", []string{"127.0.0.1:26379", "127.0.0.1:26380"}, "m", 0, ""},
		"WithSentinelPw": {"redis-sentinel://:s3cret@127.0.0.1:26379,127.0.0.1:26380?master=m", []string{"127.0.0.1:26379", "127.0.0.1:26380"}, "m", 0, "s3cret"},
	}
	for name, tc := range sentinels {
		t.Run("Sentinel"+name, func(t *testing.T) {
			c, err := openRedis(tc.url)
			require.NoError(t, err)
			t.Cleanup(func() { _ = c.Close() })
			_, ok := c.(*redis.Client)
			require.True(t, ok, "a failover client")
			opt, err := parseFailover(tc.url[len("redis-sentinel://"):])
			require.NoError(t, err)
			require.Equal(t, tc.addrs, opt.SentinelAddrs)
			require.Equal(t, tc.master, opt.MasterName)
			require.Equal(t, tc.db, opt.DB)
			require.Equal(t, tc.sentinelP, opt.SentinelPassword)
			co, err := asynqConnOpt(tc.url)
			require.NoError(t, err)
			require.Equal(t, tc.addrs, co.(asynq.RedisFailoverClientOpt).SentinelAddrs)
		})
	}
	clusters := map[string]struct {
		url   string
		addrs []string
	}{
		"Documented":  {"redis-cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003", []string{"127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"}},
		"GoRedisForm": {"redis-cluster://127.0.0.1:7001?addr=127.0.0.1:7002", []string{"127.0.0.1:7001", "127.0.0.1:7002"}},
	}
	for name, tc := range clusters {
		t.Run("Cluster"+name, func(t *testing.T) {
			opt, err := parseCluster(tc.url[len("redis-cluster://"):])
			require.NoError(t, err)
			require.Equal(t, tc.addrs, opt.Addrs)
			co, err := asynqConnOpt(tc.url)
			require.NoError(t, err)
			require.Equal(t, tc.addrs, co.(asynq.RedisClusterClientOpt).Addrs)
		})
	}
	bad := map[string]string{
		"SentinelNoMaster":   "redis-sentinel://127.0.0.1:26379/0",
		"SentinelBothNames":  "redis-sentinel://127.0.0.1:26379/0?master=a&master_name=b",
		"ClusterEmptyHost":   "redis-cluster://127.0.0.1:7001,,127.0.0.1:7003",
		"ClusterNoPort":      "redis-cluster://127.0.0.1:7001,127.0.0.1",
		"SentinelUnknownOpt": "redis-sentinel://127.0.0.1:26379/0?master=m&bogus=1",
	}
	for name, u := range bad {
		t.Run("Refuses"+name, func(t *testing.T) {
			_, err := openRedis(u)
			require.Error(t, err)
			require.Contains(t, err.Error(), "REDIS_URL")
		})
	}
}

func TestAckReplicas(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url, env string
		want     int
		bad      bool
	}{
		{"redis://127.0.0.1:6379/0", "", 0, false},
		{"redis-sentinel://127.0.0.1:26379/0?master=m", "", 1, false},
		{"redis-sentinel://127.0.0.1:26379/0?master=m", "0", 0, false},
		{"redis://127.0.0.1:6379/0", "2", 2, false},
		{"redis://127.0.0.1:6379/0", "abc", 0, true},
		{"redis://127.0.0.1:6379/0", "-1", 0, true},
		{"redis://127.0.0.1:6379/0", "1x", 0, true},
	} {
		env, _, _ := testEnv(map[string]string{envRedisURL: tc.url, envAckReps: tc.env})
		cfg := newConfig(cmdWorker, cmdWorker, "", env)
		err := cfg.parse(nil)
		if tc.bad {
			require.ErrorContains(t, err, "VAULTFLEET_ACK_REPLICAS", tc.env)
			continue
		}
		require.NoError(t, err)
		c := commonFrom(cfg)
		require.Equal(t, tc.want, c.ackReplicas(), "%s %q", tc.url, tc.env)
	}
}
