// compose-config renders docker-compose.yml as Docker Compose v2 does — the same loader
// (compose-spec/compose-go): the compose-spec JSON schema, interpolation from an env file,
// merging and normalisation — and prints the resolved project as JSON, for
// tests/ops_config.rs. Docker itself is not needed.
//
//	go run . ../../docker-compose.yml ../../.env.example
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: compose-config COMPOSE_FILE ENV_FILE")
		os.Exit(2)
	}
	file, env := os.Args[1], os.Args[2]
	options, err := cli.NewProjectOptions(
		[]string{file},
		cli.WithWorkingDirectory(filepath.Dir(file)),
		cli.WithEnvFiles(env),
		cli.WithDotEnv,
		cli.WithProfiles([]string{"*"}),
	)
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-config:", err)
	os.Exit(1)
}
