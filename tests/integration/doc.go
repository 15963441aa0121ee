// Package integration holds the tests that build the onebox binary and run
// real agents: clusters on loopback and, as root, in network namespaces.
package integration
