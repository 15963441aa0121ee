// Command onebox is the onebox node agent and its command-line interface:
// 'onebox agent' runs the daemon; every other verb talks to an agent.
package main

import (
	"os"

	"github.com/onebox-project/onebox/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
