package main

import (
	"bytes"
	"encoding/base64"
	"sync"
)

// syncBuffer is a bytes.Buffer safe for a process (or a command running
// in-process) writing while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testEnv is an Env reading vars, with stdout and stderr captured.
func testEnv(vars map[string]string) (Env, *syncBuffer, *syncBuffer) {
	out, errOut := &syncBuffer{}, &syncBuffer{}
	return Env{Getenv: func(k string) string { return vars[k] }, Stdout: out, Stderr: errOut}, out, errOut
}

// testKeys is an encryption keyring spec for the commands under test.
var testKeys = "k1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
