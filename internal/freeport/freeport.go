// Package freeport finds a free TCP port on the loopback interface, for
// the private redis-servers the bench and the test helper start.
// It is its own package so that the bench (production code) need not
// import internal/redistest, which imports testing.
package freeport

import "net"

// Loopback returns a TCP port on 127.0.0.1 that was free when asked (a
// listener bound it and closed it). Another process may take it before
// the caller binds it; callers retry on a failed start.
func Loopback() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
