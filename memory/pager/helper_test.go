package pager

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

// TestMain doubles as a pager process for TestPagerKilled: with
// ONEBOX_TEST_PAGER=SOCK set, the test binary serves SOCK and stalls
// after a few faults, until it is killed.
func TestMain(m *testing.M) {
	if sock := os.Getenv("ONEBOX_TEST_PAGER"); sock != "" {
		os.Exit(helperPager(sock))
	}
	os.Exit(m.Run())
}

func helperPager(sock string) int {
	l, err := Listen(sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, err := New(Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Answer the first faults, then block every later one: a fault in
	// flight when the pager dies.
	var mu sync.Mutex
	left := 100
	var once sync.Once
	p.testStall = func() {
		mu.Lock()
		left--
		n := left
		mu.Unlock()
		if n >= 0 {
			return
		}
		once.Do(func() { fmt.Println("stalled") })
		select {}
	}
	fmt.Println("listening")
	p.Serve(l, 0)
	return 0
}
