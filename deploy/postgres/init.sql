-- Roles for the Compose stack: the owner runs migrations, the service reads and writes.
CREATE ROLE order_owner LOGIN PASSWORD 'order_owner_compose';
CREATE ROLE order_service LOGIN PASSWORD 'order_service_compose';
CREATE DATABASE orders OWNER order_owner;
REVOKE ALL ON DATABASE orders FROM PUBLIC;
GRANT CONNECT ON DATABASE orders TO order_service;
